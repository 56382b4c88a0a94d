"""``manage.py seed``: fill the shop with a fixed, repeatable data set.

Big enough that the report in ``shop/reports.py`` is real work for the
database (a few hundred thousand order lines joined and aggregated), made
from a fixed random seed so every machine gets the same rows. Seeding twice
does nothing: the data is there when the last table is full.
"""

from __future__ import annotations

import random
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import connection, transaction

from shop.models import Category, Customer, Order, OrderLine, Product

CATEGORIES = 24
PRODUCTS = 3_000
CUSTOMERS = 20_000
ORDERS = 60_000
LINES = 180_000
BATCH = 5_000
COUNTRIES = ["DE", "FR", "GB", "IT", "ES", "NL", "PL", "SE", "US", "CA", "BR", "JP"]
#: The admin login the seed creates: a demo on localhost, never a real site.
ADMIN_USER = "demo"


class Command(BaseCommand):
    help = "Create the demo shop's rows (skipped when they are already there)."

    def handle(self, *args: Any, **options: Any) -> None:
        if OrderLine.objects.count() >= LINES:
            self.stdout.write(f"seed: already seeded ({LINES:,} order lines)")
            return
        started = time.monotonic()
        rng = random.Random(6)
        with transaction.atomic():
            OrderLine.objects.all().delete()
            Order.objects.all().delete()
            Customer.objects.all().delete()
            Product.objects.all().delete()
            Category.objects.all().delete()
            seed_rows(rng)
            seed_admin()
        self.stdout.write(
            f"seed: {LINES:,} order lines in {ORDERS:,} orders, "
            f"{time.monotonic() - started:.1f} s"
        )


def seed_rows(rng: random.Random) -> None:
    """Categories, products, customers, orders and their lines."""
    categories = Category.objects.bulk_create(
        Category(name=f"Category {n:02d}") for n in range(CATEGORIES)
    )
    products = Product.objects.bulk_create(
        (
            Product(
                name=f"Product {n:05d}",
                category=rng.choice(categories),
                price=Decimal(rng.randint(199, 19_999)) / 100,
            )
            for n in range(PRODUCTS)
        ),
        batch_size=BATCH,
    )
    customers = Customer.objects.bulk_create(
        (
            Customer(name=f"Customer {n:05d}", country=rng.choice(COUNTRIES))
            for n in range(CUSTOMERS)
        ),
        batch_size=BATCH,
    )
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    orders = Order.objects.bulk_create(
        (
            Order(
                customer=rng.choice(customers),
                placed_at=start + timedelta(minutes=rng.randint(0, 2 * 525_600)),
            )
            for _ in range(ORDERS)
        ),
        batch_size=BATCH,
    )
    insert_lines(rng, [order.pk for order in orders], products)


def insert_lines(
    rng: random.Random, order_ids: list[int], products: list[Product]
) -> None:
    """The order lines, with plain ``executemany``: model instances would
    take most of the seeding time for rows nobody reads back."""
    table = OrderLine._meta.db_table
    sql = (
        f"INSERT INTO {table} (order_id, product_id, quantity, unit_price) "  # noqa: S608
        "VALUES (%s, %s, %s, %s)"
    )
    with connection.cursor() as cursor:
        for first in range(0, LINES, BATCH):
            rows = []
            for n in range(first, min(first + BATCH, LINES)):
                product = rng.choice(products)
                rows.append(
                    (
                        order_ids[n % len(order_ids)],
                        product.pk,
                        rng.randint(1, 5),
                        product.price,
                    )
                )
            cursor.executemany(sql, rows)


def seed_admin() -> None:
    """A superuser to look at the data in the admin (password = user name)."""
    users = get_user_model().objects
    if not users.filter(username=ADMIN_USER).exists():
        users.create_superuser(ADMIN_USER, "demo@example.com", ADMIN_USER)
