"""The hit path in CPU instructions: django-apee against django-redis, immune to load.

Wall-clock ratios (``bench/hitpath.py``) move with whatever else a shared
machine runs. ``valgrind --tool=callgrind`` counts the instructions the
client executes instead, the same from run to run within a few thousand.
For each (backend, read) this runs a child process twice under callgrind,
once doing ``--calls`` reads of a present ~200 B dict (``get_many``: 20 of
them) and once doing none
(both after the same 50 warm-up reads), and prints the difference per call,
counted on the main thread only (the stats flush and clock threads run on
wall time) with a fixed hash seed. What Redis does is not counted.

Run (needs valgrind)::

    python bench/hitpath_instructions.py [--calls 1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.redis_server import RedisServer  # noqa: E402

#: (label, what the child reads with): django-apee's reads and the peer's.
READS = [
    ("get", "apee", "get"),
    ("get", "django_redis", "get"),
    ("get_many(20)", "apee", "many"),
    ("get_many(20)", "django_redis", "many"),
    ("stampede-safe hit / get_or_set", "apee", "safe"),
    ("stampede-safe hit / get_or_set", "django_redis", "safe"),
]

CHILD = """
import os, random, sys
sys.path.insert(0, {root!r})
import django
from django.conf import settings
settings.configure(SECRET_KEY="bench" * 10, CACHES={{
    "apee": {{"BACKEND": "django_apee.cache.ApeeCache", "LOCATION": {url!r},
              "TIMEOUT": 3600, "KEY_PREFIX": "a"}},
    "django_redis": {{"BACKEND": "django_redis.cache.RedisCache",
                      "LOCATION": {url!r}, "TIMEOUT": 3600, "KEY_PREFIX": "d"}}}})
django.setup()
from django.core.cache import caches
from bench.hitpath import small_dict
cache = caches[{alias!r}]
cache.set("k", small_dict(random.Random(1)), 3600)
keys = [f"k{{n}}" for n in range(20)]
cache.set_many(
    {{key: small_dict(random.Random(n)) for n, key in enumerate(keys)}}, 3600
)
if {op!r} == "get":
    read = lambda: cache.get("k")
elif {op!r} == "many":
    read = lambda: cache.get_many(keys)
elif {alias!r} == "apee":
    read = lambda: cache.get_or_set_stampede_safe("k", lambda: 1, 3600)
else:
    read = lambda: cache.get_or_set("k", lambda: 1, 3600)
for _ in range(50):
    read()
for _ in range({calls}):
    read()
"""


def instructions(url: str, alias: str, op: str, calls: int) -> int:
    """The main thread's instructions for a child doing ``calls`` reads."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "callgrind.out")
        code = CHILD.format(root=str(ROOT), url=url, alias=alias, op=op, calls=calls)
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--separate-threads=yes",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-c",
                code,
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        main_thread = Path(f"{out}-01").read_text(errors="replace")
    for line in main_thread.splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError("callgrind wrote no totals")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        per_call = {
            (label, alias): (
                instructions(server.url, alias, op, args.calls)
                - instructions(server.url, alias, op, 0)
            )
            / args.calls
            for label, alias, op in READS
        }
    finally:
        server.close()
    print(f"{'read':34}{'django-apee':>14}{'django-redis':>14}{'ratio':>8}")
    for label in dict.fromkeys(label for label, _, _ in READS):
        apee, peer = per_call[label, "apee"], per_call[label, "django_redis"]
        ratio = apee / peer
        print(f"{label:34}{apee / 1000:>13.1f}k{peer / 1000:>13.1f}k{ratio:>8.2f}")


if __name__ == "__main__":
    main()
