from django.contrib import admin

from shop.models import Category, Customer, Order, OrderLine, Product


@admin.register(Category)
class CategoryAdmin(admin.ModelAdmin):
    search_fields = ("name",)


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ("name", "category", "price")
    list_filter = ("category",)
    search_fields = ("name",)


@admin.register(Customer)
class CustomerAdmin(admin.ModelAdmin):
    list_display = ("name", "country")
    list_filter = ("country",)
    search_fields = ("name",)


class OrderLineInline(admin.TabularInline):
    model = OrderLine
    raw_id_fields = ("product",)
    extra = 0


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ("id", "customer", "placed_at")
    date_hierarchy = "placed_at"
    raw_id_fields = ("customer",)
    inlines = (OrderLineInline,)
    # 100,000 orders: an exact count on every changelist page is wasted work.
    show_full_result_count = False
