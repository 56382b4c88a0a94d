"""``{% apee_cache %}`` on a real Redis, in threads and in real processes.

The first part checks the tag against Django's ``{% cache %}``: the same
syntax, errors and keys, plus ``soft=``, safe strings and the fallback to
``{% cache %}``'s get/render/set on other backends. Then background
refreshes in real threads: a fragment refreshed in the background renders
with the context, language and time zone it had when the tag ran.

The last part renders templates in 2 processes x 32 threads released
together (``tests/support/render_worker.py``), counting renders with a raw Redis
INCR: one render fleet-wide for a stale and for a cold fragment, with
``{% apee_cache %}`` and with Django's own ``{% cache %}`` on an ApeeCache
(which relies on the backend's herd mode for plain get/set, and for a cold
fragment on its ``COLD_MISS_WAIT``).

Each test uses aliases of its own: coordinators (single-flight, breaker,
refresh pool) are kept per alias and process.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.core.cache.utils import make_template_fragment_key
from django.template import TemplateSyntaxError, engines
from django.test import override_settings
from django.utils import translation
from django.utils.safestring import SafeString

from django_apee.cache import ApeeCache
from tests.support import target
from tests.support.children import Child
from tests.support.render_worker import SPEC_VARIABLE

ROOT = Path(__file__).resolve().parents[2]
APEE = "django_apee.cache.ApeeCache"
LOCMEM = "django.core.cache.backends.locmem.LocMemCache"
_aliases = itertools.count()


# -- helpers -------------------------------------------------------------------------


class Probe:
    """A context value that counts the renders printing it, optionally slow."""

    def __init__(self, sleep: float = 0.0) -> None:
        self.sleep = sleep
        self.renders = 0
        self._lock = threading.Lock()

    def __str__(self) -> str:
        with self._lock:
            self.renders += 1
            number = self.renders
        if self.sleep:
            time.sleep(self.sleep)
        return str(number)


class Pause(Probe):
    """A Probe that prints nothing: a slow spot inside a fragment."""

    def __str__(self) -> str:
        super().__str__()
        return ""


def render(source: str, **context: Any) -> str:
    """Compile ``source`` with ``{% load apee %}`` and render it."""
    template = engines["django"].from_string("{% load apee %}" + source)
    return str(template.render(context))


def compile_only(source: str) -> Any:
    return engines["django"].from_string("{% load apee %}" + source)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


Aliases = Callable[..., str]


@pytest.fixture
def alias() -> Iterator[Aliases]:
    """``alias(**OPTIONS) -> name``: a fresh ApeeCache alias on the test Redis.

    ``alias(backend=LOCMEM)`` makes a LocMemCache alias instead.
    """
    with ExitStack() as stack:

        def make(backend: str = APEE, name: str = "", **options: Any) -> str:
            made = name or f"fragments-{next(_aliases)}"
            config: dict[str, Any] = {"BACKEND": backend, "LOCATION": made}
            if backend == APEE:
                config = {
                    **target.cache_config(options),
                    "KEY_PREFIX": made,  # apart from "default"'s entries
                }
            stack.enter_context(
                override_settings(CACHES={**settings.CACHES, made: config})
            )
            return made

        yield make


def stored_meta(raw_redis: redis.Redis, cache_alias: str, key: str) -> Any:
    cache = caches[cache_alias]
    assert isinstance(cache, ApeeCache)
    made = cache.client.make_key(key)
    raw = raw_redis.get(made)
    assert raw is not None
    return cache.envelope.decode(raw, key=made).meta


def pttl(raw_redis: redis.Redis, cache_alias: str, key: str) -> int:
    return int(raw_redis.pttl(caches[cache_alias].client.make_key(key)))


# -- syntax and semantics, as {% cache %} --------------------------------------------


def test_fragment_renders_once_then_is_served_from_the_cache():
    probe = Probe()
    source = "{% apee_cache 60 sidebar %}<p>{{ probe }}</p>{% endapee_cache %}"
    assert render(source, probe=probe) == "<p>1</p>"
    assert render(source, probe=probe) == "<p>1</p>"
    assert probe.renders == 1
    key = make_template_fragment_key("sidebar")
    assert caches["default"].get(key) == "<p>1</p>"


def test_keys_are_make_template_fragment_key_of_name_and_vary_on():
    probe = Probe()
    source = "{% apee_cache 60 row a b %}[{{ a }}{{ b }}{{ probe }}]{% endapee_cache %}"
    assert render(source, a=1, b="x", probe=probe) == "[1x1]"
    assert render(source, a=2, b="x", probe=probe) == "[2x2]"
    assert render(source, a=1, b="x", probe=probe) == "[1x1]"
    assert probe.renders == 2
    cache = caches["default"]
    assert cache.get(make_template_fragment_key("row", [1, "x"])) == "[1x1]"
    assert cache.get(make_template_fragment_key("row", [2, "x"])) == "[2x2]"


def test_fragment_name_is_the_raw_token_as_in_django():
    # As {% cache %}: options are only looked for after two arguments, and a
    # quoted name keeps its quotes.
    render('{% apee_cache 60 using="x" %}A{% endapee_cache %}')
    render('{% apee_cache 60 "quoted" %}B{% endapee_cache %}')
    cache = caches["default"]
    assert cache.get(make_template_fragment_key('using="x"')) == "A"
    assert cache.get(make_template_fragment_key('"quoted"')) == "B"


def test_cache_tag_and_apee_cache_share_their_entries():
    probe = Probe()
    django_source = "{% load cache %}{% cache 60 shared v %}<{{ probe }}>{% endcache %}"
    django_tag = engines["django"].from_string(django_source)
    assert django_tag.render({"probe": probe, "v": 7}) == "<1>"
    apee = "{% apee_cache 60 shared v %}<{{ probe }}>{% endapee_cache %}"
    assert render(apee, probe=probe, v=7) == "<1>"
    assert render(apee, probe=probe, v=8) == "<2>"
    assert django_tag.render({"probe": probe, "v": 8}) == "<2>"
    assert probe.renders == 2


def test_invalidation_with_make_template_fragment_key(alias):
    name = alias()
    probe = Probe()
    source = "{% apee_cache 60 menu user using=alias %}({{ probe }}){% endapee_cache %}"
    assert render(source, probe=probe, user="ann", alias=name) == "(1)"
    assert render(source, probe=probe, user="bob", alias=name) == "(2)"
    caches[name].delete(make_template_fragment_key("menu", ["ann"]))
    assert render(source, probe=probe, user="ann", alias=name) == "(3)"
    assert render(source, probe=probe, user="bob", alias=name) == "(2)"
    assert probe.renders == 3


@pytest.mark.parametrize(
    "using", ['using="{name}"', "using=alias", "using=alias|lower"]
)
def test_using_names_the_cache(alias, using):
    name = alias()
    source = (
        "{% apee_cache 60 nav " + using.format(name=name) + " %}N{% endapee_cache %}"
    )
    assert render(source, alias=name) == "N"
    key = make_template_fragment_key("nav")
    assert caches[name].get(key) == "N"
    assert caches["default"].get(key) is None


def test_unknown_cache_alias_is_a_template_syntax_error():
    with pytest.raises(TemplateSyntaxError, match="Invalid cache name"):
        render('{% apee_cache 60 nav using="nowhere" %}N{% endapee_cache %}')


def test_template_fragments_alias_is_preferred_when_there_is_one(alias):
    alias(backend=LOCMEM, name="template_fragments")
    render("{% apee_cache 60 nav %}N{% endapee_cache %}")
    key = make_template_fragment_key("nav")
    assert caches["template_fragments"].get(key) == "N"
    assert caches["default"].get(key) is None


@pytest.mark.parametrize(
    "options",
    [
        "soft=20 using=alias",
        "using=alias soft=20",
        "using=alias soft=soft",
        'soft="20" using=alias',
        "soft=20.0 using=alias",
    ],
)
def test_soft_sets_the_soft_timeout_in_any_order(alias, raw_redis, options):
    name = alias()
    source = "{% apee_cache 60 box x " + options + " %}B{% endapee_cache %}"
    assert render(source, alias=name, soft=20, x=1) == "B"
    meta = stored_meta(raw_redis, name, make_template_fragment_key("box", [1]))
    assert (meta.soft_ms, meta.hard_ms) == (20_000, 60_000)


def test_without_soft_the_cache_ratio_applies(alias, raw_redis):
    name = alias(SOFT_TIMEOUT_RATIO=0.5)
    render("{% apee_cache 60 box using=alias %}B{% endapee_cache %}", alias=name)
    meta = stored_meta(raw_redis, name, make_template_fragment_key("box"))
    assert (meta.soft_ms, meta.hard_ms) == (30_000, 60_000)


def test_soft_resolving_to_none_is_left_to_the_cache(alias, raw_redis):
    name = alias(SOFT_TIMEOUT_RATIO=0.5)
    source = "{% apee_cache 60 box using=alias soft=soft %}B{% endapee_cache %}"
    render(source, alias=name, soft=None)
    meta = stored_meta(raw_redis, name, make_template_fragment_key("box"))
    assert meta.soft_ms == 30_000


@pytest.mark.parametrize("expire", ["None", "forever"])
def test_expire_none_never_expires(alias, raw_redis, expire):
    name = alias()
    source = f"{{% apee_cache {expire} box using=alias soft=5 %}}B{{% endapee_cache %}}"
    assert render(source, alias=name, forever=None) == "B"
    assert pttl(raw_redis, name, make_template_fragment_key("box")) == -1


@pytest.mark.parametrize("ttl", [120, "120", 120.9])
def test_expire_time_may_be_a_variable_and_int_like(alias, raw_redis, ttl):
    name = alias()
    source = "{% apee_cache ttl box using=alias %}B{% endapee_cache %}"
    assert render(source, alias=name, ttl=ttl) == "B"
    assert 119_000 < pttl(raw_redis, name, make_template_fragment_key("box")) <= 120_000


def test_expire_zero_renders_every_time_and_stores_nothing(alias, raw_redis):
    name = alias()
    probe = Probe()
    source = "{% apee_cache 0 box using=alias soft=5 %}{{ probe }}{% endapee_cache %}"
    assert render(source, alias=name, probe=probe) == "1"
    assert render(source, alias=name, probe=probe) == "2"
    assert raw_redis.dbsize() == 0


@pytest.mark.parametrize("expire", ["soon", '"ten"', "empty", "missing"])
def test_non_integer_expire_time_raises_at_render(expire):
    template = compile_only(f"{{% apee_cache {expire} box %}}B{{% endapee_cache %}}")
    with pytest.raises(TemplateSyntaxError, match="non-integer timeout value"):
        template.render({"soon": "later", "empty": []})


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{% apee_cache 60 %}x{% endapee_cache %}", "at least 2 arguments"),
        ("{% apee_cache %}x{% endapee_cache %}", "at least 2 arguments"),
        ("{% apee_cache 60 a soft=1 soft=2 %}x{% endapee_cache %}", "more than once"),
        ('{% apee_cache 60 a using="d" using="d" %}x{% endapee_cache %}', "more than"),
        ("{% apee_cache 60 a %}x", "endapee_cache"),
    ],
)
def test_bad_syntax_is_a_template_syntax_error_at_compile(source, message):
    with pytest.raises(TemplateSyntaxError, match=message):
        compile_only(source)


@pytest.mark.parametrize("backend", [APEE, LOCMEM])
def test_soft_longer_than_expire_time_is_a_clear_error(alias, backend):
    name = alias(backend=backend)
    source = "{% apee_cache 60 box using=alias soft=90 %}B{% endapee_cache %}"
    with pytest.raises(TemplateSyntaxError, match="longer than its expire time 60"):
        render(source, alias=name)


@pytest.mark.parametrize("soft", ["0", "-5", '"soon"', "nan", "missing"])
def test_soft_must_be_a_positive_number(alias, soft):
    name = alias()
    source = f"{{% apee_cache 60 box using=alias soft={soft} %}}B{{% endapee_cache %}}"
    with pytest.raises(TemplateSyntaxError, match="greater than 0"):
        render(source, alias=name, nan=float("nan"))


@pytest.mark.parametrize("codec", ["pickle", "msgpack"])
def test_fragments_come_back_as_safe_strings(alias, codec):
    name = alias(CODEC=codec, ALLOW_PICKLE=codec == "pickle")
    probe = Probe()
    source = (
        "{% apee_cache 60 card using=alias %}<b>{{ who }}</b>{{ probe }}"
        "{% endapee_cache %}"
    )
    first = render(source, alias=name, who="<i>Ann</i>", probe=probe)
    assert first == "<b>&lt;i&gt;Ann&lt;/i&gt;</b>1"
    again = render(source, alias=name, who="<i>Bob</i>", probe=probe)
    assert again == first  # served from the cache: the HTML is not escaped twice
    assert probe.renders == 1
    cached = caches[name].get(make_template_fragment_key("card"))
    assert isinstance(cached, SafeString)
    assert cached == first


def test_another_backend_gets_djangos_get_render_set(alias):
    name = alias(backend=LOCMEM)
    probe = Probe()
    source = (
        "{% apee_cache 60 box v using=alias soft=30 %}<{{ probe }}>{% endapee_cache %}"
    )
    assert render(source, alias=name, probe=probe, v=1) == "<1>"
    assert render(source, alias=name, probe=probe, v=1) == "<1>"
    assert probe.renders == 1
    key = make_template_fragment_key("box", [1])
    assert caches[name].get(key) == "<1>"
    caches[name].delete(key)
    assert render(source, alias=name, probe=probe, v=1) == "<2>"


def test_an_error_while_rendering_reaches_the_caller_and_stores_nothing(alias):
    name = alias()

    class Broken:
        def __str__(self) -> str:
            raise ValueError("no sidebar today")

    source = "{% apee_cache 60 box using=alias %}{{ broken }}{% endapee_cache %}"
    with pytest.raises(ValueError, match="no sidebar today"):
        render(source, alias=name, broken=Broken())
    assert caches[name].get(make_template_fragment_key("box")) is None
    assert render(source, alias=name, broken="fine") == "fine"


# -- refreshes in the background: what the fragment renders with ---------------------


def make_stale(cache_alias: str, key: str, old: str) -> None:
    """Store ``old`` under ``key`` already past its (1 ms) soft timeout."""
    cache = caches[cache_alias]
    cache.get_or_set_stampede_safe(key, lambda: SafeString(old), 60, soft_timeout=0.001)
    time.sleep(0.005)  # let the 1 ms soft timeout pass


def test_background_refresh_inside_a_loop_renders_its_own_item(alias):
    name = alias(REFRESH="background", REFRESH_WORKERS=4)
    items = ["a", "b", "c", "d"]
    fragment_keys = [make_template_fragment_key("row", [item]) for item in items]
    for key in fragment_keys:
        make_stale(name, key, "old;")
    slow = Pause(sleep=0.1)  # the loop is over long before a refresh reads {{ item }}
    source = (
        "{% for item in items %}{% apee_cache 60 row item using=alias soft=30 %}"
        "{{ slow }}[{{ item }}:{{ forloop.counter }}];{% endapee_cache %}"
        "{% endfor %}"
    )
    assert render(source, alias=name, items=items, slow=slow) == "old;" * 4
    cache = caches[name]
    assert wait_for(lambda: all(cache.get(k) != "old;" for k in fragment_keys))
    refreshed = [cache.get(key) for key in fragment_keys]
    assert refreshed == ["[a:1];", "[b:2];", "[c:3];", "[d:4];"]
    assert slow.renders == 4


def test_background_refresh_renders_in_the_requests_language_and_zone(alias):
    from django.utils import timezone

    name = alias(REFRESH="background")
    key = make_template_fragment_key("lang")
    make_stale(name, key, "old")
    source = (
        "{% load i18n tz %}{% apee_cache 60 lang using=alias soft=30 %}"
        "{% get_current_language as language %}{% get_current_timezone as zone %}"
        "{{ language }} {{ zone }}{% endapee_cache %}"
    )
    with translation.override("fr"), timezone.override("Asia/Tokyo"):
        assert render(source, alias=name) == "old"
    cache = caches[name]
    assert wait_for(lambda: cache.get(key) != "old")
    assert cache.get(key) == "fr Asia/Tokyo"


def test_inline_refresh_hands_the_new_fragment_to_its_renderer(alias):
    name = alias(REFRESH="inline")
    key = make_template_fragment_key("box")
    make_stale(name, key, "old")
    probe = Probe()
    source = (
        "{% apee_cache 60 box using=alias soft=30 %}new {{ probe }}{% endapee_cache %}"
    )
    assert render(source, alias=name, probe=probe) == "new 1"
    assert render(source, alias=name, probe=probe) == "new 1"
    assert caches[name].get(key) == "new 1"


def test_fragment_render_does_not_leak_into_the_rest_of_the_page(alias):
    # {% cache %} renders with the live context, so a variable set inside the
    # fragment is seen after it on a miss only; the copy makes it never.
    name = alias()
    source = (
        "{% load i18n %}{% apee_cache 60 box using=alias %}"
        "{% get_current_language as leaked %}in{% endapee_cache %}[{{ leaked }}]"
    )
    assert render(source, alias=name) == "in[]"
    assert render(source, alias=name) == "in[]"


# -- 2 processes x 32 threads, renders counted in Redis ------------------------------

OLD_FRAGMENT = "<p>old fragment</p>"
OLD_PAGE = f"<main>{OLD_FRAGMENT}</main>\n"
NEW_FRAGMENT = "<p>fresh fragment #1</p>"
NEW_PAGE = f"<main>{NEW_FRAGMENT}</main>\n"
STAMPEDE_KEY = make_template_fragment_key("stampede")
PROCESSES, THREADS = 2, 32


Fleet = Callable[..., tuple[str, list[dict[str, Any]]]]


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    """``fleet(template, options, counter, before_go) -> (alias, outcomes)``.

    Starts ``PROCESSES`` workers of ``THREADS`` threads on a fresh ApeeCache
    alias (also set up here, so the test can prepare entries through it),
    runs ``before_go(alias)`` once all are ready, releases them together and
    returns what every thread's render returned, after every worker exited.
    """
    started: list[Child] = []
    with ExitStack() as stack:

        def run(
            template: str,
            options: dict[str, Any],
            counter: str,
            before_go: Callable[[str], None] = lambda name: None,
        ) -> tuple[str, list[dict[str, Any]]]:
            name = f"fleet-{next(_aliases)}-{os.getpid()}"
            config = target.cache_config(options)
            stack.enter_context(
                override_settings(CACHES={**settings.CACHES, name: config})
            )
            spec = {
                "alias": name,
                "options": options,
                "template": template,
                "threads": THREADS,
                "counter": counter,
                "render_s": 0.3,
            }
            workers = [
                Child(
                    "tests.support.render_worker", env={SPEC_VARIABLE: json.dumps(spec)}
                )
                for _ in range(PROCESSES)
            ]
            started.extend(workers)
            for worker in workers:
                worker.wait_ready()
            before_go(name)
            for worker in workers:
                worker.go()
            reports = [worker.finish() for worker in workers]
            assert [report["hung"] for report in reports] == [0] * PROCESSES
            return name, [found for report in reports for found in report["results"]]

        try:
            yield run
        finally:
            for worker in started:
                worker.kill()


def pages_of(results: list[dict[str, Any]]) -> list[str]:
    failed = [result for result in results if "error" in result]
    assert not failed, failed[0]["trace"]
    assert len(results) == PROCESSES * THREADS
    return [result["html"] for result in results]


def renders(raw_redis: redis.Redis, counter: str) -> int:
    return int(raw_redis.get(counter) or 0)


def stale_by_apee(name: str) -> None:
    """An old fragment written with a short soft timeout, now past it."""
    caches[name].get_or_set_stampede_safe(
        STAMPEDE_KEY, lambda: SafeString(OLD_FRAGMENT), 10, soft_timeout=0.5
    )
    time.sleep(0.6)  # the entry ages past its soft timeout, far from its hard one


def stale_by_plain_set(name: str) -> None:
    """An old fragment written by plain ``cache.set``, now past its soft timeout.

    The alias's SOFT_TIMEOUT_RATIO of 0.05 puts it at 0.5 s of the 10 s.
    """
    caches[name].set(STAMPEDE_KEY, SafeString(OLD_FRAGMENT), 10)
    time.sleep(0.6)


def test_apee_cache_stale_fragment_renders_once_across_the_fleet(fleet, raw_redis):
    counter = "test:renders:apee-stale"
    name, results = fleet("apee_tests/stampede_apee.html", {}, counter, stale_by_apee)
    pages = pages_of(results)
    assert set(pages) <= {OLD_PAGE, NEW_PAGE}, set(pages)
    assert renders(raw_redis, counter) == 1  # the one background refresh
    assert caches[name].get(STAMPEDE_KEY) == NEW_FRAGMENT


def test_apee_cache_cold_fragment_renders_once_across_the_fleet(fleet, raw_redis):
    counter = "test:renders:apee-cold"
    _, results = fleet("apee_tests/stampede_apee.html", {}, counter)
    assert set(pages_of(results)) == {NEW_PAGE}
    assert renders(raw_redis, counter) == 1


def test_cache_tag_stale_fragment_renders_once_across_the_fleet(fleet, raw_redis):
    # Herd mode: past the soft timeout of an entry written by plain set, one
    # get fleet-wide misses (and that caller re-renders and sets); every
    # other get keeps returning the old fragment.
    counter = "test:renders:django-stale"
    name, results = fleet(
        "apee_tests/stampede_django.html",
        {"SOFT_TIMEOUT_RATIO": 0.05},
        counter,
        stale_by_plain_set,
    )
    pages = pages_of(results)
    assert set(pages) <= {OLD_PAGE, NEW_PAGE}, set(pages)
    assert renders(raw_redis, counter) == 1
    assert caches[name].get(STAMPEDE_KEY) == NEW_FRAGMENT


def test_cache_tag_cold_fragment_renders_once_with_cold_miss_wait(fleet, raw_redis):
    # COLD_MISS_WAIT: a get on an absent key that another caller is filling
    # waits (bounded) for its set instead of missing too.
    counter = "test:renders:django-cold"
    _, results = fleet(
        "apee_tests/stampede_django.html", {"COLD_MISS_WAIT": 5}, counter
    )
    assert set(pages_of(results)) == {NEW_PAGE}
    assert renders(raw_redis, counter) == 1
