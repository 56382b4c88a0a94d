"""Django system checks for every ApeeCache alias.

Static checks (``apee.E…``) read only settings: they run with every
``manage.py`` command and never talk to Redis. Live checks (``apee.W…``) run
only under ``check --deploy`` and talk to Redis through the backend's own
connection, so everything the site connects with applies to them too
(``PASSWORD``, ``USERNAME``, TLS, ``CONNECTION_POOL_KWARGS``, Sentinel, the
client class); a connection of their own would report a password-protected
Redis as unreachable. Its socket timeouts and ``REDIS_RETRIES`` bound them
(1 s to connect, 2 s to answer, no retry by default). ``apee.W001``/``W002``
ask Redis how it is configured (``observe.server.lint``); a Redis that cannot
be reached is a warning saying so, never an exception. ``apee.W006`` asks
whether the alias's user may use its wake-up channel (on a cluster with
sharded pub/sub, its shard channels).
"""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from redis.exceptions import NoPermissionError

from django_apee.client import client_class
from django_apee.cluster import ApeeClusterClient, cluster_problems
from django_apee.conf import apee_aliases, parse, utc_today
from django_apee.core.keys import slot_channel
from django_apee.store.slots import supports_sharded_pubsub
from django_apee.store.wake import CHANNEL_PREFIX, acl_rule, acl_user, wake_channel

#: How long the wake-channel check waits for its SUBSCRIBE to be confirmed (s).
LIVE_TIMEOUT = 1.0
#: The key whose shard channel the check tries on a cluster (any would do).
PROBE_KEY = "apee-check"


def register() -> None:
    checks.register(check_options, "caches")
    checks.register(check_redis, "caches", deploy=True)
    checks.register(check_legacy_reads, "caches", "security", deploy=True)
    checks.register(check_wake_channel, "caches", deploy=True)
    checks.register(check_holder_checks, "caches", deploy=True)


def _apee_caches() -> dict[str, dict[str, Any]]:
    return {alias: settings.CACHES[alias] for alias in apee_aliases(settings.CACHES)}


def check_options(**kwargs: Any) -> list[checks.CheckMessage]:
    """Everything ``conf.parse`` finds, and an unusable CLIENT_CLASS.

    apee.E001 a bad value; E002 an unusable CLIENT_CLASS; E003 a bad METRICS
    or STATS_FLUSH_INTERVAL; E004 Django's ``serializer``, which cannot
    apply; E005 a REDIS_RETRIES that is not an int >= 0; E006 a bad
    NEAR_CACHE; W003 a key nobody reads (with the closest valid name);
    E010-E011 and W010 what a cluster cannot do (``cluster.cluster_problems``).
    """
    found: list[checks.CheckMessage] = []
    for alias, config in _apee_caches().items():
        parsed, problems = parse(config.get("OPTIONS") or {})
        for problem in problems:
            kind = checks.Error if problem.is_error else checks.Warning
            found.append(
                kind(problem.message, hint=problem.hint, obj=alias, id=problem.id)
            )
        if any(problem.id == "apee.E001" for problem in problems):
            continue
        try:
            klass = client_class(parsed.client_class)
        except (ImproperlyConfigured, ImportError) as error:
            found.append(checks.Error(str(error), obj=alias, id="apee.E002"))
            continue
        if issubclass(klass, ApeeClusterClient):
            for problem in cluster_problems(config, parsed.redis_options):
                kind = checks.Error if problem.is_error else checks.Warning
                found.append(
                    kind(problem.message, hint=problem.hint, obj=alias, id=problem.id)
                )
    return found


def check_legacy_reads(**kwargs: Any) -> list[checks.CheckMessage]:
    """apee.W004 LEGACY_READS is on; W005 its end date has passed."""
    found: list[checks.CheckMessage] = []
    today = utc_today()
    for alias, config in _apee_caches().items():
        parsed, _ = parse(config.get("OPTIONS") or {})
        until = parsed.legacy_reads_until
        if until is None:
            continue
        if parsed.legacy_reads_on(today):
            found.append(
                checks.Warning(
                    f"LEGACY_READS is on until {until}: values without "
                    "django-apee's header are unpickled, so whoever can write "
                    "to this Redis can run code in your workers.",
                    hint="Remove LEGACY_READS once entries written before the "
                    "switch have expired.",
                    obj=alias,
                    id="apee.W004",
                )
            )
        else:
            found.append(
                checks.Warning(
                    f"LEGACY_READS_UNTIL ({until}) has passed: legacy reads are off.",
                    hint="Remove LEGACY_READS and LEGACY_READS_UNTIL.",
                    obj=alias,
                    id="apee.W005",
                )
            )
    return found


def check_redis(**kwargs: Any) -> list[checks.CheckMessage]:
    """apee.W001 Redis unreachable; W002 each finding of the configuration lint."""
    found: list[checks.CheckMessage] = []
    for alias in _apee_caches():
        found += _live(alias)
    return found


def _live(alias: str) -> list[checks.CheckMessage]:
    from django_apee.observe import server

    try:
        lint = server.lint(_client(alias))
    except Exception as error:  # any failure to look is a warning, not a crash
        return [
            checks.Warning(
                f"could not check the Redis of cache {alias!r}: {error}",
                hint="apee_stats --check lints it once Redis is reachable.",
                obj=alias,
                id="apee.W001",
            )
        ]
    return [
        checks.Warning(
            f"Redis {one['name']} is {one['value']!r}",
            hint=one["advice"],
            obj=alias,
            id="apee.W002",
        )
        for one in lint["checks"]
        if one["status"] == "finding"
    ]


def _client(alias: str) -> Any:
    """The alias's own Redis client for its primary (the backend's pool).

    Built by the backend, so its OPTIONS apply: credentials, TLS, pool
    arguments, Sentinel. Bad OPTIONS raise here (ImproperlyConfigured), which
    the caller reports as "could not check" next to apee.E001.
    """
    return caches[alias].client.get_client(write=True)


def check_wake_channel(**kwargs: Any) -> list[checks.CheckMessage]:
    """apee.W006: the alias's Redis user may not use its wake-up channel.

    On a cluster whose primaries have sharded pub/sub (Redis/Valkey 7+) the
    wake-ups go by SSUBSCRIBE/SPUBLISH on a channel per hash slot
    (``store/shardwake.py``): those are tried, on one of the prefix's shard
    channels, and the hint grants them all. Asked through the backend's own
    connection (``_client``). A Redis that cannot be reached, or bad
    OPTIONS, are other checks' business (apee.W001, E001): skipped here.
    """
    found: list[checks.CheckMessage] = []
    for alias in _apee_caches():
        sharded = False
        try:
            backend = caches[alias]
            channel = wake_channel(backend.key_prefix)
            client = _client(alias)
            sharded = isinstance(
                backend.client, ApeeClusterClient
            ) and supports_sharded_pubsub(client)
            if sharded:
                made = str(backend.client.make_key(PROBE_KEY))
                denied = _shard_denied_on(client, slot_channel(made, channel))
            else:
                denied = _denied_on(client, channel)
        except Exception:  # unreachable, misconfigured: said elsewhere
            denied = []
        if denied:
            user = acl_user(client)
            where = (
                f"the wake-up channels '*|{channel}' (sharded pub/sub: one "
                "per hash slot)"
                if sharded
                else f"the wake-up channel {channel!r}"
            )
            every = f"*|{CHANNEL_PREFIX}*" if sharded else f"{CHANNEL_PREFIX}*"
            found.append(
                checks.Warning(
                    f"the Redis user {user!r} may not {' or '.join(denied)} on "
                    f"{where}: waiters are not woken when a computation ends "
                    "and wait to its lease's end (slower, never wrong).",
                    hint=f"Grant it: {acl_rule(channel, user, sharded=sharded)} "
                    f"(or &{every} for every prefix)"
                    + (", on every node." if sharded else "."),
                    obj=alias,
                    id="apee.W006",
                )
            )
    return found


def _denied_on(client: Any, channel: str) -> list[str]:
    """Which of SUBSCRIBE and PUBLISH ``client``'s user is refused on ``channel``.

    Tries both for real: the empty message published names no key, so it
    wakes nobody. Errors other than NOPERM propagate.
    """
    denied: list[str] = []
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(channel)
        deadline = time.monotonic() + LIVE_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=left)  # NOPERM raises here
            if message is not None and message["type"] == "subscribe":
                break
    except NoPermissionError:
        denied.append("SUBSCRIBE")
    finally:
        pubsub.close()
    try:
        client.publish(channel, "")
    except NoPermissionError:
        denied.append("PUBLISH")
    return denied


def _shard_denied_on(cluster: Any, channel: str) -> list[str]:
    """Which of SSUBSCRIBE and SPUBLISH a cluster's user is refused on the
    shard ``channel`` (tried for real, as ``_denied_on``: the empty message
    wakes nobody). Errors other than NOPERM propagate."""
    denied: list[str] = []
    pubsub = cluster.pubsub()
    try:
        pubsub.ssubscribe(channel)
        deadline = time.monotonic() + LIVE_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            message = pubsub.get_sharded_message(timeout=left)  # NOPERM raises
            if message is not None and message["type"] == "ssubscribe":
                break
    except NoPermissionError:
        denied.append("SSUBSCRIBE")
    finally:
        pubsub.close()
    try:
        cluster.spublish(channel, "")
    except NoPermissionError:
        denied.append("SPUBLISH")
    return denied


def check_holder_checks(**kwargs: Any) -> list[checks.CheckMessage]:
    """apee.W007: the alias's Redis user may not run CLIENT ID / CLIENT LIST.

    Without them a lease whose holder process died is taken over only when
    it expires, not at once (``store/holder.py``). Asked through the
    backend's own connection; skipped for aliases with ``HOLDER_CHECK = 0``
    and when Redis cannot be reached (apee.W001 says so).
    """
    found: list[checks.CheckMessage] = []
    for alias in _apee_caches():
        denied: list[str] = []
        try:
            backend = caches[alias]
            client = backend.client.get_client(write=True)
            if backend.options.tuning.holder_check:
                denied = _holder_commands_denied(client)
        except Exception:  # unreachable, misconfigured: said elsewhere
            denied = []
        if denied:
            found.append(
                checks.Warning(
                    f"the Redis user {acl_user(client)!r} may not run "
                    f"{' or '.join(denied)}: a lease whose holder process died "
                    "is taken over only when it expires (up to the lease's "
                    "length), not at once.",
                    hint="Grant it: ACL SETUSER <user> +client|id +client|list "
                    "(or set HOLDER_CHECK to 0 to accept expiry).",
                    obj=alias,
                    id="apee.W007",
                )
            )
    return found


def _holder_commands_denied(client: Any) -> list[str]:
    """Which of CLIENT ID and CLIENT LIST the user is refused (NOPERM)."""
    denied: list[str] = []
    for command in (("CLIENT", "ID"), ("CLIENT", "LIST", "ID", "0")):
        try:
            client.execute_command(*command)
        except NoPermissionError:
            denied.append(" ".join(command[:2]))
    return denied
