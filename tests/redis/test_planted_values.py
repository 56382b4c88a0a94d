"""Someone who can write to Redis, against a real ApeeCache with default OPTIONS.

Two attacks that worked before format version 2 (only pickles were signed,
and no signature was bound to its key), each now a counted miss:

- a planted *unsigned* msgpack envelope: a ``SafeString`` holding a
  ``<script>``, printed unescaped by ``{% apee_cache %}``; a plain string,
  printed unescaped by Django's ``{% cache %}``;
- the bytes of ``perms:user:2`` copied onto ``perms:user:1``: user 2's
  ``{"is_admin": True}`` served for user 1.

Each attack is first shown to reach the reader (the same bytes with a valid
MAC for that key *are* served), so a miss here is the MAC's doing.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import redis
from django.core.cache.utils import make_template_fragment_key
from django.template import engines
from prometheus_client import REGISTRY

from django_apee.cache import signing_keys
from django_apee.core.envelope import DecodeError
from django_apee.core.mac import Macs, bind
from django_apee.core.wire import FORMAT_VERSION, MAGIC

SCRIPT = "<script>steal(document.cookie)</script>"
EXT_SAFESTRING = 12  # core/extensions.py's code for SafeString
OPTION_SETS = [
    pytest.param({}, id="default-options"),
    pytest.param({"CODEC": "msgpack"}, id="msgpack"),
    pytest.param({"CODEC": "msgpack", "ALLOW_PICKLE": False}, id="no-pickle"),
]


def errors(alias: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "apee_cache_serialization_errors_total", {"cache": alias, "reason": reason}
    )
    return value or 0.0


def planted(payload: bytes, *, version: int = FORMAT_VERSION) -> bytes:
    """A msgpack envelope as an attacker writes it: no MAC they could compute.

    Version 1's layout had no MAC for msgpack at all; version 2's has one,
    filled here with what the attacker has: nothing.
    """
    head = MAGIC + bytes((version, 0x00))
    return head + (bytes(16) if version >= 2 else b"") + payload


def forged(made: str, payload: bytes) -> bytes:
    """The same bytes with a valid MAC for ``made``: what only the app can write."""
    head = MAGIC + bytes((FORMAT_VERSION, 0x00))
    return head + Macs(signing_keys()).sign(bind(made), head, payload) + payload


def render(source: str, **context: Any) -> str:
    template = engines["django"].from_string("{% load apee cache %}" + source)
    return str(template.render(context))


# -- a planted <script> --------------------------------------------------------------


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize(
    ("tag", "payload"),
    [
        pytest.param(
            "apee_cache",
            msgpack.packb(msgpack.ExtType(EXT_SAFESTRING, SCRIPT.encode())),
            id="apee_cache-safestring",
        ),
        pytest.param(
            "cache",
            msgpack.packb(msgpack.ExtType(EXT_SAFESTRING, SCRIPT.encode())),
            id="cache-safestring",
        ),
        pytest.param("cache", msgpack.packb(SCRIPT), id="cache-plain-string"),
    ],
)
def test_a_planted_fragment_is_a_miss_and_is_rendered_anew(
    make_cache: Any,
    raw_redis: redis.Redis,
    options: dict[str, Any],
    tag: str,
    payload: bytes,
) -> None:
    alias, cache = make_cache(**options)
    source = (
        f'{{% {tag} 600 sidebar using="{alias}" %}}'
        f"<p>{{{{ name }}}}</p>{{% end{tag} %}}"
    )
    made = str(cache.make_key(make_template_fragment_key("sidebar")))

    # The reader does read what lies there: with the app's MAC, it is served.
    raw_redis.set(made, forged(made, payload))
    assert render(source, name="<b>") == SCRIPT

    for bytes_planted, reason in [
        (planted(payload, version=1), "version"),  # the attack as it was
        (planted(payload), "signature"),  # the same, in version 2's layout
    ]:
        raw_redis.set(made, bytes_planted)
        before = errors(alias, reason)
        rendered = render(source, name="<b>")
        assert rendered == "<p>&lt;b&gt;</p>"  # rendered anew, escaped
        assert SCRIPT not in rendered
        # Counted (the stampede-safe path may read it twice: before and
        # after taking the lease).
        assert errors(alias, reason) > before
        # And what is stored now is the safe render, with a MAC.
        assert render(source, name="other") == "<p>&lt;b&gt;</p>"
        assert cache.get(make_template_fragment_key("sidebar")) == "<p>&lt;b&gt;</p>"


# -- perms:user:2 copied onto perms:user:1 -------------------------------------------


@pytest.mark.parametrize("options", OPTION_SETS)
def test_a_value_copied_from_another_key_is_a_miss(
    make_cache: Any, raw_redis: redis.Redis, options: dict[str, Any]
) -> None:
    alias, cache = make_cache(**options)
    cache.set("perms:user:1", {"is_admin": False}, 600)
    cache.set("perms:user:2", {"is_admin": True}, 600)
    user_1, user_2 = (str(cache.make_key(f"perms:user:{n}")) for n in (1, 2))

    raw_redis.set(user_1, raw_redis.get(user_2), keepttl=True)
    before = errors(alias, "signature")

    assert cache.get("perms:user:1") is None
    assert cache.get_many(["perms:user:1", "perms:user:2"]) == {
        "perms:user:2": {"is_admin": True}
    }
    assert errors(alias, "signature") == before + 2
    assert cache.get_or_set("perms:user:1", lambda: {"is_admin": False}, 600) == {
        "is_admin": False
    }
    assert errors(alias, "signature") > before + 2
    assert cache.get("perms:user:1") == {"is_admin": False}  # recomputed, bound


@pytest.mark.parametrize("options", OPTION_SETS)
def test_a_value_copied_across_versions_is_a_miss_but_incr_version_moves_it(
    make_cache: Any, raw_redis: redis.Redis, options: dict[str, Any]
) -> None:
    _, cache = make_cache(**options)
    cache.set("perms", {"is_admin": True}, 600, version=1)
    old, new = (str(cache.make_key("perms", version=v)) for v in (1, 2))
    raw_redis.set(new, raw_redis.get(old))
    assert cache.get("perms", version=2) is None

    raw_redis.delete(new)
    assert cache.incr_version("perms", version=1) == 2
    assert cache.get("perms", version=2) == {"is_admin": True}
    assert cache.get("perms", version=1) is None
    assert raw_redis.pttl(new) > 0  # the TTL came along


def test_an_unreadable_value_is_not_moved_by_incr_version(
    make_cache: Any, raw_redis: redis.Redis
) -> None:
    alias, cache = make_cache()
    cache.set("victim", "x", 600)
    raw_redis.set(str(cache.make_key("victim")), planted(msgpack.packb("planted")))
    before = errors(alias, "signature")
    with pytest.raises(ValueError, match="not found"):
        cache.incr_version("victim")
    assert errors(alias, "signature") == before + 1
    assert raw_redis.exists(str(cache.make_key("victim", version=2))) == 0


def test_raw_ints_stay_unsigned_and_atomic(
    make_cache: Any, raw_redis: redis.Redis
) -> None:
    _, cache = make_cache()
    cache.set("hits", 41, 600)
    made = str(cache.make_key("hits"))
    assert raw_redis.get(made) == b"41"  # ASCII digits, INCR-able
    assert cache.incr("hits") == 42
    raw_redis.set(made, b"7")  # anyone with write access can set a counter
    assert cache.get("hits") == 7  # and an int is all it can ever be
    assert cache.incr_version("hits") == 2
    assert raw_redis.get(str(cache.make_key("hits", version=2))) == b"7"


def test_set_members_are_authenticated_but_not_bound(
    make_cache: Any, raw_redis: redis.Redis
) -> None:
    _, cache = make_cache()
    cache.sadd("roles", ("editor", 1))
    assert cache.smembers("roles") == {("editor", 1)}
    assert cache.sismember("roles", ("editor", 1))
    member = raw_redis.smembers(str(cache.make_key("roles"))).pop()
    # A member moved into another set still reads (bound to no key) ...
    raw_redis.sadd(str(cache.make_key("other-roles")), member)
    assert cache.smembers("other-roles") == {("editor", 1)}
    # ... but a planted one does not, and a member is no key's value.
    raw_redis.sadd(str(cache.make_key("roles")), planted(msgpack.packb("admin")))
    with pytest.raises(DecodeError) as info:
        cache.smembers("roles")
    assert info.value.reason == "signature"
    raw_redis.set(str(cache.make_key("roles-value")), member)
    assert cache.get("roles-value") is None
