"""``manage.py apee_stats``: a cache's Redis, its fleet counters, one key, a lint.

Gathering lives in ``django_apee.observe``; this command finds each alias's
backend and connection, picks the mode, loops for ``--watch`` and formats (an
aligned table, or JSON shaped as ``django_apee/observe/stats.schema.json``).

What it shows may come from anyone who can write to Redis, so key names are
escaped (no terminal control sequences), passwords in LOCATION are redacted,
``--scan`` stays inside the alias's KEY_PREFIX unless ``--all-keys`` and masks
session keys, and ``--key`` does not unpickle a value unless ``--show-value``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.core.management.base import BaseCommand, CommandError, CommandParser
from redis.exceptions import RedisError

from django_apee.cache import ApeeCache
from django_apee.conf import apee_aliases
from django_apee.observe import nodes, stats
from django_apee.observe.text import printable, redact_url
from django_apee.store import gauges

#: Exit status when --check finds something (errors reaching Redis exit 1).
FINDINGS_EXIT = 2


class Command(BaseCommand):  # type: ignore[misc]
    help = (
        "Show django-apee caches: Redis health and the fleet's counters; "
        "inspect one key (--key), list the largest keys (--scan) or lint "
        "the Redis configuration (--check)."
    )

    def add_base_argument(self, parser: CommandParser, *args: Any, **kw: Any) -> None:
        """Leave ``--version`` to the cache key version, as the issue asks."""
        if "--version" not in args:
            super().add_base_argument(parser, *args, **kw)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--cache", action="append", help="alias (repeatable; default: all)"
        )
        parser.add_argument("--key", help="inspect one entry")
        parser.add_argument(
            "--version", dest="key_version", type=int, help="the key's version"
        )
        parser.add_argument(
            "--scan",
            nargs="?",
            const="",
            metavar="PATTERN",
            help="largest keys matching PATTERN (default: the alias's keys)",
        )
        parser.add_argument("--top", type=int, default=20)
        parser.add_argument(
            "--all-keys",
            action="store_true",
            help="--scan the whole database, not only the alias's KEY_PREFIX",
        )
        parser.add_argument(
            "--show-value",
            action="store_true",
            help="--key: also decode the value (unpickled if its MAC verifies)",
        )
        parser.add_argument(
            "--check", action="store_true", help="lint the Redis configuration"
        )
        parser.add_argument("--json", action="store_true", help="JSON output")
        parser.add_argument(
            "--watch", type=float, metavar="SECONDS", help="repeat every SECONDS"
        )
        parser.add_argument(
            "--count", type=int, default=10, help="how many --watch rounds (10)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        aliases = options["cache"] or apee_aliases(settings.CACHES)
        if not aliases:
            raise CommandError("no django_apee ApeeCache in CACHES")
        mode = self._mode(options)
        rounds = max(1, options["count"]) if options["watch"] else 1
        previous: dict[str, Any] = {}
        failed = findings = 0
        for round_ in range(rounds):
            if round_:
                time.sleep(options["watch"])
            report = {"schema_version": stats.SCHEMA_VERSION, "mode": mode}
            results = [self._gather(mode, alias, options) for alias in aliases]
            if mode == "overview":
                for result in results:
                    _interval_rates(result, previous, time.monotonic())
            report["results"] = results
            failed = sum(1 for r in results if "error" in r)
            findings = sum(r.get("lint", {}).get("findings", 0) for r in results)
            self._emit(report, options["json"])
        if failed:
            raise CommandError(f"{failed} cache(s) could not be read", returncode=1)
        if findings:
            raise CommandError(
                f"--check: {findings} finding(s) in the Redis configuration",
                returncode=FINDINGS_EXIT,
            )

    @staticmethod
    def _mode(options: dict[str, Any]) -> str:
        chosen = [
            name
            for name, on in (
                ("key", options["key"] is not None),
                ("scan", options["scan"] is not None),
                ("check", options["check"]),
            )
            if on
        ]
        if len(chosen) > 1:
            raise CommandError("choose one of --key, --scan and --check")
        return chosen[0] if chosen else "overview"

    @staticmethod
    def _gather(mode: str, alias: str, options: dict[str, Any]) -> dict[str, Any]:
        def gather() -> dict[str, Any]:
            backend = backend_of(alias)
            client = backend.client.get_client(write=True)
            if mode == "overview":
                parts = nodes.overview_parts(client, backend.key_prefix)
                found = {
                    "alias": alias,
                    "location": location(backend),
                    **parts,
                    "fleet": stats.fleet_counters(client, backend.key_prefix, alias),
                }
                near = gauges.read(client, backend.key_prefix, alias)
                if near:
                    found["near_processes"] = near
                return found
            if mode == "key":
                key, version = options["key"], options["key_version"]
                made = str(backend.client.make_key(key, version=version))
                found = stats.inspect_entry(
                    client,
                    made,
                    backend.envelope,
                    backend.options.policy,
                    show_value=options["show_value"],
                )
                return {"alias": alias, "entry": {"key": key, **found}}
            if mode == "scan":
                pattern = scan_pattern(
                    backend.key_prefix, options["scan"], options["all_keys"]
                )
                found = nodes.scan_top(client, pattern, options["top"])
                return {"alias": alias, "scan": found}
            return {"alias": alias, "lint": nodes.lint(client)}

        try:
            return guarded(alias, gather)
        except stats.StatsError as error:
            return {"alias": alias, "error": str(error)}

    def _emit(self, report: dict[str, Any], as_json: bool) -> None:
        if as_json:
            self.stdout.write(json.dumps(report, sort_keys=True))
            return
        for result in report["results"]:
            self.stdout.write(human(report["mode"], result))


def _interval_rates(
    result: dict[str, Any], previous: dict[str, Any], now: float
) -> None:
    """Under --watch: per-second rates of the fleet totals since the last round."""
    if "fleet" not in result:
        return
    totals = result["fleet"]["totals"]
    last = previous.get(result["alias"])
    previous[result["alias"]] = (now, totals)
    if last is None:
        return
    seconds = now - last[0]
    delta = {k: v - last[1].get(k, 0) for k, v in totals.items()}
    result["fleet"]["interval"] = {
        "seconds": round(seconds, 3),
        "rates": stats.rates(delta, seconds),
        "ratios": stats.ratios(delta),
    }


# -- where the figures come from -------------------------------------------------------


def backend_of(alias: str) -> ApeeCache:
    if alias not in settings.CACHES:
        raise stats.StatsError(f"no cache alias {alias!r} in CACHES")
    backend = caches[alias]
    if not isinstance(backend, ApeeCache):
        raise stats.StatsError(f"cache {alias!r} is not a django_apee ApeeCache")
    return backend


def location(backend: ApeeCache) -> str:
    """The alias's first server, never with a password."""
    servers = backend._server
    first = servers[0] if isinstance(servers, (list, tuple)) else str(servers)
    return redact_url(str(first).split(",")[0])


def scan_pattern(key_prefix: str, pattern: str, all_keys: bool) -> str:
    """``--scan``'s SCAN pattern: inside the alias's keys unless ``--all-keys``."""
    if all_keys:
        return pattern or "*"
    return f"{key_prefix}:{pattern or '*'}"


def guarded(alias: str, gather: Any) -> dict[str, Any]:
    """Run ``gather()``; a Redis failure becomes a StatsError (no traceback)."""
    try:
        result: dict[str, Any] = gather()
    except (RedisError, OSError) as error:
        raise stats.StatsError(
            f"cache {alias!r}: Redis unreachable: {error}"
        ) from error
    except Exception as error:
        if type(error).__name__ == "ConnectionInterrupted":
            message = f"cache {alias!r}: Redis unreachable: {error}"
            raise stats.StatsError(message) from error
        raise
    return result


# -- human output ----------------------------------------------------------------------


def table(rows: list[tuple[str, Any]], indent: str = "  ") -> str:
    """Aligned rows; every cell escaped, since key names come from Redis."""
    cells = [(printable(str(name)), printable(str(value))) for name, value in rows]
    width = max((len(name) for name, _ in cells), default=0)
    lines = (f"{indent}{name.ljust(width)}  {value}" for name, value in cells)
    return "\n".join(line.rstrip() for line in lines)


def _size(value: Any) -> str:
    if not isinstance(value, int):
        return "unknown" if value is None else str(value)
    if value < 1024:
        return f"{value} B"
    scaled = float(value)
    for unit in ("KiB", "MiB", "GiB"):
        scaled /= 1024
        if scaled < 1024 or unit == "GiB":
            break
    return f"{scaled:.1f} {unit}"


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


def _secs(value: Any) -> str:
    return "n/a" if value is None else f"{value * 1000:.2f} ms"


def _ms(value: Any) -> str:
    return "n/a" if value is None else f"{value / 1000:.3f} s"


def human(mode: str, result: dict[str, Any]) -> str:
    head = f"cache {result['alias']!r}"
    if "error" in result:
        return f"{head}: ERROR {printable(result['error'])}"
    body = {
        "overview": _human_overview,
        "key": _human_key,
        "scan": _human_scan,
        "check": _human_check,
    }[mode](result)
    return f"{head}\n{body}\n"


def _human_overview(result: dict[str, Any]) -> str:
    server, fleet, held = result["server"], result["fleet"], result["leases"]
    memory = f"{_size(server['used_memory'])} of {_size(server['maxmemory'] or None)}"
    if server["memory_ratio"] is not None:
        memory += f" ({_pct(server['memory_ratio'])})"
    clients = f"{server['connected_clients']} of {server['maxclients']}"
    totals, window = fleet["totals"], fleet["window"]
    ratios, rates = fleet["ratios"], fleet["rates"]
    rows: list[tuple[str, Any]] = [
        ("redis", f"{result['location']}  {server['version']} ({server['role']})"),
        ("memory", memory),
        ("fragmentation", server["fragmentation_ratio"]),
        ("evicted keys", server["evicted_keys"]),
        ("eviction policy", server["maxmemory_policy"]),
        ("clients", clients),
        ("keyspace hit ratio", _pct(server["keyspace_hit_ratio"])),
        ("", ""),
        (f"fleet, last {fleet['window_seconds']:.0f} s", "window / total"),
        ("get hits", f"{window.get('hits', 0)} / {totals.get('hits', 0)}"),
        ("get misses", f"{window.get('misses', 0)} / {totals.get('misses', 0)}"),
        ("hit ratio", _pct(ratios["hit_ratio"])),
        (
            "stampede-safe hits",
            f"{window.get('stampede_hits', 0)} / {totals.get('stampede_hits', 0)}",
        ),
        (
            "stampede-safe misses",
            f"{window.get('stampede_misses', 0)} / {totals.get('stampede_misses', 0)}",
        ),
        ("stampede hit ratio", _pct(ratios["stampede_hit_ratio"])),
        ("stale share of hits", _pct(ratios["stale_share"])),
        ("gets per second", rates["gets_per_second"]),
        ("computes per minute", rates["computes_per_minute"]),
        ("fallbacks per minute", rates["fallbacks_per_minute"]),
        ("lease wait p95", _secs(ratios["lease_wait_p95_seconds"])),
        ("serialization errors", stats.sum_of(window, "serialization_errors")),
        *_near_rows(totals, window, ratios),
        ("", ""),
        ("leases held now", f"{held['count']}{'' if held['complete'] else '+'}"),
    ]
    oldest = held["oldest"]
    if oldest is not None:
        rows.append(
            (
                "oldest lease",
                f"{oldest['key']} by {oldest['holder']}, "
                f"{oldest['age_seconds']:.1f} s old, {_ms(oldest['ttl_ms'])} left",
            )
        )
    for node in result.get("nodes", ()):  # Redis Cluster: each primary
        health = node["server"]
        rows.append(
            (
                f"primary {node['address']}",
                f"{_size(health['used_memory'])}, {health['maxmemory_policy']}, "
                f"{health['evicted_keys']} evicted, {node['leases']['count']} leases",
            )
        )
    rows += _near_process_rows(result.get("near_processes", ()))
    interval = fleet.get("interval")
    if interval is not None:
        rows.append(
            (
                f"last {interval['seconds']:.1f} s",
                f"{interval['rates']['gets_per_second']} gets/s, hit ratio "
                f"{_pct(interval['ratios']['hit_ratio'])}",
            )
        )
    return table(rows)


#: The most processes listed one by one (all are summed).
NEAR_PROCESSES_SHOWN = 5


def _near_process_rows(processes: Any) -> list[tuple[str, Any]]:
    """Each process's near cache now: the sum, then the largest few."""
    if not processes:
        return []
    entries = sum(p.get("entries", 0) for p in processes)
    held = sum(p.get("bytes", 0) for p in processes)
    rows: list[tuple[str, Any]] = [
        (
            f"near caches, {len(processes)} processes",
            f"{entries} entries, {_size(held)}",
        )
    ]
    for found in processes[:NEAR_PROCESSES_SHOWN]:
        rows.append(
            (
                f"  {found['process']}",
                f"{found.get('entries', 0)} of {found.get('max_entries', '?')} "
                f"entries, {_size(found.get('bytes'))} of "
                f"{_size(found.get('max_bytes'))}",
            )
        )
    return rows


def _near_rows(
    totals: dict[str, int], window: dict[str, int], ratios: dict[str, Any]
) -> list[tuple[str, Any]]:
    """The near cache's counters, for aliases where some process ran one."""
    names = ("near_hits", "near_invalidations", "near_evictions", "near_flushes")
    if not any(totals.get(name) for name in names):
        return []
    rows: list[tuple[str, Any]] = [
        (name.replace("_", " "), f"{window.get(name, 0)} / {totals.get(name, 0)}")
        for name in names
    ]
    rows.insert(1, ("near share of hits", _pct(ratios.get("near_share"))))
    return rows


def _human_key(result: dict[str, Any]) -> str:
    entry = result["entry"]
    rows: list[tuple[str, Any]] = [
        ("key", entry["key"]),
        ("redis key", entry["redis_key"]),
        ("state", entry["state"]),
    ]
    if entry["encoding"] is not None:
        rows += [
            ("encoding", entry["encoding"] + _error(entry)),
            ("codec", entry.get("codec", "-")),
            ("compression", entry.get("compression", "-")),
            ("stored bytes", entry["stored_bytes"]),
            ("raw bytes", entry.get("raw_bytes", "-")),
            ("hard TTL left", _ms(entry.get("hard_ttl_ms"))),
            ("soft TTL left", _ms(entry.get("soft_ttl_ms"))),
            ("delta (compute time)", _ms(entry.get("delta_ms"))),
        ]
        if "value" in entry:
            rows.append(("value", entry["value"]))
    held = entry["lease"]
    if held is None:
        rows.append(("lease", "none"))
    else:
        rows.append(("lease", f"held by {held['holder']}, {_ms(held['ttl_ms'])} left"))
    return table(rows)


def _error(entry: dict[str, Any]) -> str:
    return f" ({entry['error']})" if "error" in entry else ""


def _human_scan(result: dict[str, Any]) -> str:
    scan = result["scan"]
    rows = [(one["key"], _size(one["memory_bytes"])) for one in scan["top"]]
    more = "" if scan["complete"] else " (stopped at the bound)"
    pattern = printable(scan["pattern"])
    head = f"  {scan['scanned']} keys scanned matching {pattern!r}{more}"
    return head + ("\n" + table(rows) if rows else "\n  none")


def _human_check(result: dict[str, Any]) -> str:
    lint = result["lint"]
    rows = [
        (
            one["name"],
            f"{(one['value'] or '?'):<24} {one['status'].upper():<8} {one['advice']}",
        )
        for one in lint["checks"]
    ]
    tail = f"\n  {lint['findings']} finding(s), {lint['unknown']} unknown"
    return table(rows) + tail
