"""apee_stats on a Redis anyone may have written to: nothing leaks, nothing breaks.

A password in LOCATION never reaches the output; key names that are not
UTF-8 or carry terminal escapes are shown escaped; ``--scan`` stays inside
the alias's keys and masks session keys; ``--key`` does not unpickle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test.utils import override_settings

from tests.support.tls_sentinel_servers import ProbedRedisServer

APEE = "django_apee.cache.ApeeCache"
PASSWORD = "hunter2-not-a-real-one"
ESCAPE = "\x1b[2J\x1b[31m"


@pytest.fixture(scope="module")
def locked() -> Iterator[ProbedRedisServer]:
    server = ProbedRedisServer(("--requirepass", PASSWORD), password=PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.close()


def run(location: str, *args: str) -> tuple[int, str]:
    caches_setting = {
        **settings.CACHES,
        "locked": {"BACKEND": APEE, "LOCATION": location},
    }
    out = StringIO()
    with override_settings(CACHES=caches_setting):
        try:
            call_command("apee_stats", "--cache", "locked", *args, stdout=out)
        except CommandError as error:
            return error.returncode, out.getvalue() + str(error)
    return 0, out.getvalue()


def raw_client(server: ProbedRedisServer) -> redis.Redis:
    return redis.Redis(port=server.port, password=PASSWORD)


@pytest.fixture
def hostile(locked: ProbedRedisServer) -> Iterator[redis.Redis]:
    """The locked server holding hostile key names, inside and outside the prefix."""
    client = raw_client(locked)
    client.flushdb()
    client.set(b":1:bad\xff\xfename", b"x" * 5000)
    client.set(f":1:red{ESCAPE}alert".encode(), b"y" * 4000)
    client.set(b":1:django.contrib.sessions.cacheabcdef0123456789", b"z" * 3000)
    client.set(b"other-app:secret-looking-key", b"w" * 9000)
    # A lease on a key whose name is not UTF-8, held right now.
    client.set(b"{:1:lease\xff}|apee:lease", "host:1:1:abc", px=30_000)
    yield client
    client.flushdb()
    client.close()


@pytest.mark.parametrize(
    "location",
    [
        "redis://:{p}@127.0.0.1:{port}/0",
        "redis://default:{p}@127.0.0.1:{port}/0",
        "redis://127.0.0.1:{port}/0?password={p}",
    ],
)
def test_no_password_in_text_or_json(locked, hostile, location):
    url = location.format(p=PASSWORD, port=locked.port)
    for args in ((), ("--json",), ("--scan",), ("--check",), ("--key", "k")):
        code, text = run(url, *args)
        assert code in (0, 2), text  # 2: --check findings
        assert PASSWORD not in text
    _, text = run(url)
    assert f"127.0.0.1:{locked.port}" in text
    assert "***" in text


def test_hostile_key_names_are_escaped_never_a_crash(locked, hostile):
    url = f"redis://:{PASSWORD}@127.0.0.1:{locked.port}/0"
    code, text = run(url, "--scan")
    assert code == 0, text
    assert "\x1b" not in text
    assert r"\x1b[2J\x1b[31m" in text
    assert r"bad\xff\xfename" in text
    code, text = run(url)  # the overview reads the lease on the odd key
    assert code == 0, text
    assert "leases held now       1" in text
    code, text = run(url, "--json", "--scan")
    assert code == 0
    (document,) = [json.loads(line) for line in text.splitlines() if line]
    names = [one["key"] for one in document["results"][0]["scan"]["top"]]
    assert f":1:red{ESCAPE}alert" in names  # JSON escapes it itself
    assert r":1:bad\xff\xfename" in names


def test_scan_stays_in_the_prefix_and_masks_sessions(locked, hostile):
    url = f"redis://:{PASSWORD}@127.0.0.1:{locked.port}/0"
    _, text = run(url, "--scan")
    assert "other-app" not in text
    assert "abcdef0123456789" not in text
    assert ":1:django.contrib.sessions.cache***" in text
    _, text = run(url, "--scan", "--all-keys")
    assert "other-app:secret-looking-key" in text
    assert "abcdef0123456789" not in text


FIRED: list[str] = []


def fire(tag: str) -> None:
    FIRED.append(tag)


class Tripwire:
    """Unpickling one of these records it: a describe must not."""

    def __reduce__(self) -> Any:
        return (fire, ("unpickled",))


def test_key_describes_without_unpickling_unless_asked(make_cache):
    alias, cache = make_cache()
    cache.set("trap", Tripwire(), 60)
    out = StringIO()
    FIRED.clear()
    with override_settings(CACHES={**settings.CACHES, alias: settings.CACHES[alias]}):
        call_command("apee_stats", "--cache", alias, "--key", "trap", stdout=out)
        assert FIRED == []
        text = out.getvalue()
        assert "pickle" in text
        assert "raw bytes" in text
        call_command(
            "apee_stats", "--cache", alias, "--key", "trap", "--show-value", stdout=out
        )
    assert FIRED == ["unpickled"]
    assert caches[alias].client.make_key("trap")


def test_show_value_in_json_is_escaped_and_valid(make_cache):
    from importlib import resources

    import jsonschema

    schema = json.loads(
        resources.files("django_apee.observe").joinpath("stats.schema.json").read_text()
    )
    alias, cache = make_cache()
    cache.set("shown", {"text": ESCAPE + "x" * 5000}, 60)
    out = StringIO()
    with override_settings(CACHES={**settings.CACHES, alias: settings.CACHES[alias]}):
        call_command(
            "apee_stats", "--cache", alias, "--key", "shown", "--show-value",
            "--json", stdout=out,
        )  # fmt: skip
    document = json.loads(out.getvalue())
    jsonschema.validate(document, schema)
    shown = document["results"][0]["entry"]["value"]
    assert "\x1b" not in shown
    assert len(shown) <= 2100
