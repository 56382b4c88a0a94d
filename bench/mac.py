"""The envelope's MAC on the hit path: what it costs, and against what, one run.

Three measurements, each interleaved in rounds (the candidates in a new
random order every round, so that machine noise hits all of them alike):

1. **The MAC alone**, µs per sign + verify (two MACs and a ``compare_digest``,
   as one ``set`` and one ``get`` of the value do) over a 200 B, 10 KB and
   20 KB payload behind a Redis key and a header: HMAC-SHA256 through the
   ``hmac`` module, HMAC-SHA256 as ``core/mac.py`` computes it (the same
   bytes), and keyed BLAKE2b with 16- and 32-byte digests.
2. **decode()** of the bytes ``cache.set`` stores for the three payloads of
   ``bench/storage.py`` (a ~10 KB JSON-like dict, 100 ``values()`` rows, a
   ~20 KB HTML fragment), no Redis: the envelope without a MAC, with
   HMAC-SHA256 (the real one), with keyed BLAKE2b-128.
3. **cache.get** of the same payloads from a private redis-server, same three
   envelopes, each as a cache alias of its own; one get of each in turn, in a
   new order every time. A get is a round trip and a Lua script, ~100x the
   MAC: on a busy machine its median moves by more than the MAC costs, and
   section 2 is the MAC's cost on the hit path.

Both 2 and 3 run with the default options (pickle + zstd: the MAC covers the
compressed payload) and with ``COMPRESSION: "none"`` (it covers all of it).
Run::

    python bench/mac.py [--rounds 30] [--calls 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import django
from django.conf import settings

from bench.storage import html_fragment, json_like_dict, queryset_rows
from django_apee.core.mac import Macs, bind
from tests.support.redis_server import RedisServer

SIZES = {"200 B": 200, "10 KB": 10_000, "20 KB": 20_000}
REDIS_KEY = ":1:views.decorators.cache.cache_page.products.a1b2c3d4e5f6"
HEADER = b"\xc1\xa9\x02\x11\x05\x95\x01\x02\x03\x04\x05"  # as a get sees it
MAC_LEN = 16

# -- the MAC alone ---------------------------------------------------------------


def mac_candidates(key: bytes) -> dict[str, Callable[[bytes, bytes, bytes], bytes]]:
    """name -> mac(bound key, header, payload); every one a 16- or 32-byte tag."""
    hmac_base = hmac.new(key, digestmod=hashlib.sha256)
    blake16 = hashlib.blake2b(key=key, digest_size=16)
    blake32 = hashlib.blake2b(key=key, digest_size=32)
    macs = Macs([key])

    def with_hmac(bound: bytes, head: bytes, payload: bytes) -> bytes:
        mac = hmac_base.copy()
        mac.update(bound + head)
        mac.update(payload)
        return mac.digest()[:MAC_LEN]

    def keyed_blake2b(base: Any) -> Callable[[bytes, bytes, bytes], bytes]:
        def mac(bound: bytes, head: bytes, payload: bytes) -> bytes:
            state = base.copy()
            state.update(bound + head)
            state.update(payload)
            return bytes(state.digest())

        return mac

    return {
        "HMAC-SHA256 (hmac module)": with_hmac,
        "HMAC-SHA256 (core/mac.py)": macs.sign,
        "BLAKE2b-128 keyed": keyed_blake2b(blake16),
        "BLAKE2b-256 keyed": keyed_blake2b(blake32),
    }


def bench_macs(rounds: int) -> dict[str, dict[str, float]]:
    key = os.urandom(32)
    bound = bind(REDIS_KEY)
    candidates = mac_candidates(key)
    reference = candidates["HMAC-SHA256 (hmac module)"](bound, HEADER, b"x")
    assert candidates["HMAC-SHA256 (core/mac.py)"](bound, HEADER, b"x") == reference
    results: dict[str, dict[str, float]] = {}
    for size_name, size in SIZES.items():
        payload = os.urandom(size)
        calls = 2000 if size < 1000 else 400
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(rounds):
            for name in random.sample(list(candidates), len(candidates)):
                mac = candidates[name]
                tag = mac(bound, HEADER, payload)
                started = time.perf_counter()
                for _ in range(calls):
                    tag = mac(bound, HEADER, payload)
                    hmac.compare_digest(mac(bound, HEADER, payload), tag)
                samples[name].append((time.perf_counter() - started) / calls * 1e6)
        results[size_name] = {name: summary(values) for name, values in samples.items()}
    return results


def summary(samples: list[float]) -> dict[str, float]:
    """The best round (the cost itself, least disturbed) and the median one."""
    return {"min": min(samples), "median": statistics.median(samples)}


# -- decode() and cache.get ---------------------------------------------------------


class NoMac:
    """A MAC that is not one: the envelope's cost without it."""

    def __len__(self) -> int:
        return 1

    def sign(self, bound: bytes, head: bytes, payload: bytes) -> bytes:
        return bytes(MAC_LEN)

    def verify(self, bound: bytes, head: bytes, payload: bytes, tag: bytes) -> bool:
        return True


class Blake2bMac:
    """Keyed BLAKE2b-128 in the envelope's place, for comparison only."""

    def __init__(self, key: bytes) -> None:
        self._base = hashlib.blake2b(key=key, digest_size=MAC_LEN)

    def __len__(self) -> int:
        return 1

    def sign(self, bound: bytes, head: bytes, payload: bytes) -> bytes:
        state = self._base.copy()
        state.update(bound + head)
        state.update(payload)
        return bytes(state.digest())

    def verify(self, bound: bytes, head: bytes, payload: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.sign(bound, head, payload), tag)


VARIANTS = {"no MAC": "nomac", "HMAC-SHA256": "hmac", "BLAKE2b-128": "blake2b"}
CONFIGS = {"pickle + zstd": {}, "pickle, uncompressed": {"COMPRESSION": "none"}}


def alias(config: str, variant: str) -> str:
    return f"{VARIANTS[variant]}_{'zstd' if CONFIGS[config] == {} else 'none'}"


def configure(url: str) -> None:
    settings.configure(
        SECRET_KEY="bench",
        CACHES={
            alias(config, variant): {
                "BACKEND": "django_apee.cache.ApeeCache",
                "LOCATION": url,
                # Apart: every alias's bytes are bound to its own keys.
                "KEY_PREFIX": alias(config, variant),
                "OPTIONS": dict(options),
            }
            for config, options in CONFIGS.items()
            for variant in VARIANTS
        },
    )
    django.setup()


def install_macs() -> None:
    """Swap the MAC of the comparison aliases (this thread's backends)."""
    from django.core.cache import caches

    from django_apee.cache import signing_keys

    for config in CONFIGS:
        caches[alias(config, "no MAC")].envelope._macs = NoMac()
        caches[alias(config, "BLAKE2b-128")].envelope._macs = Blake2bMac(
            signing_keys()[0]
        )


def bench_hit_path(rounds: int, calls: int) -> dict[str, Any]:
    import redis
    from django.core.cache import caches

    rng = random.Random(42)
    payloads = {
        "10 KB JSON-like dict": json_like_dict(rng),
        "100 rows (values())": queryset_rows(rng),
        "20 KB HTML fragment": html_fragment(rng),
    }
    raw = redis.Redis.from_url(caches[alias("pickle + zstd", "no MAC")]._server)
    report: dict[str, Any] = {}
    for config in CONFIGS:
        for name, value in payloads.items():
            names = {variant: alias(config, variant) for variant in VARIANTS}
            stored: dict[str, bytes] = {}
            for variant, cache_alias in names.items():
                cache = caches[cache_alias]
                cache.set("bench:mac", value, None)
                assert cache.get("bench:mac") == value
                made = cache.make_key("bench:mac")
                stored[variant] = raw.get(made)
            decode_us: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
            get_us: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
            for _ in range(rounds):
                for variant in random.sample(list(VARIANTS), len(VARIANTS)):
                    cache = caches[names[variant]]
                    envelope = cache.envelope
                    made = cache.make_key("bench:mac")
                    data = stored[variant]
                    started = time.perf_counter()
                    for _ in range(calls):
                        envelope.decode(data, key=made)
                    decode_us[variant].append(
                        (time.perf_counter() - started) / calls * 1e6
                    )
                # Gets one by one, the variants in a new order each time: a
                # get is ~100x the MAC, and noise must hit every variant alike.
                for _ in range(calls // 4):
                    for variant in random.sample(list(VARIANTS), len(VARIANTS)):
                        cache = caches[names[variant]]
                        started = time.perf_counter()
                        cache.get("bench:mac")
                        get_us[variant].append((time.perf_counter() - started) * 1e6)
            report[f"{config} / {name}"] = {
                "stored_bytes": len(stored["HMAC-SHA256"]),
                "decode_us": {v: summary(s) for v, s in decode_us.items()},
                "get_us": {v: summary(s) for v, s in get_us.items()},
            }
    raw.close()
    return report


# -- the report -----------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    macs = report["mac_us"]
    names = list(next(iter(macs.values())))
    print("1. The MAC alone: µs per sign + verify, best round (median round)\n")
    print(f"  {'payload':8}" + "".join(f"{name:>28}" for name in names))
    for size, row in macs.items():
        cells = (f"{row[n]['min']:.2f} ({row[n]['median']:.2f})" for n in names)
        print(f"  {size:8}" + "".join(f"{cell:>28}" for cell in cells))
    for title, field, stat in (
        (
            "2. decode() of the stored bytes, no Redis: µs, best round",
            "decode_us",
            "min",
        ),
        ("3. cache.get from Redis: µs, p50 of all calls", "get_us", "median"),
    ):
        print(f"\n{title}\n")
        header = "".join(f"{v:>14}" for v in VARIANTS)
        print(f"  {'options / payload':46}{'stored':>8}{header}   HMAC - none")
        for row_name, row in report["hit_path"].items():
            figures = {v: row[field][v][stat] for v in VARIANTS}
            cost = figures["HMAC-SHA256"] - figures["no MAC"]
            cells = "".join(f"{figures[v]:>14.1f}" for v in VARIANTS)
            print(f"  {row_name:46}{row['stored_bytes']:>7}B{cells}   {cost:+.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    report: dict[str, Any] = {"mac_us": bench_macs(args.rounds)}
    server = RedisServer().start()
    try:
        configure(server.url)
        install_macs()
        report["hit_path"] = bench_hit_path(args.rounds, args.calls)
    finally:
        server.close()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
