"""Every benchmark in one run: the record, its charts and its tables.

Runs ``storage.py`` and then ``stampede.py`` (all six scenarios, every peer)
as they are, each with its own private redis-server, collects their JSON
reports with the machine they ran on (CPU, cores, RAM, load, OS, Python,
Redis and package versions, git commit) into one ``results.json``, and draws
the charts and tables from it (``charts.py``). Run::

    python bench/run_all.py --out docs/bench [--hot-seconds 10]
        [--storage-rounds 20] [--storage-calls 200]

Re-draw from a stored record without measuring again::

    python bench/charts.py docs/bench/results.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PACKAGES = (
    "django-apee",
    "Django",
    "django-redis",
    "redis",
    "dogpile.cache",
    "msgpack",
    "zstandard",
    "lz4",
    "matplotlib",
)


def machine() -> dict[str, Any]:
    """What the figures depend on, read from the machine itself."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": ram_gb(),
        "os": os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": redis_version(),
        "packages": {name: version(name) for name in PACKAGES},
        "git": git_commit(),
        "load_before": load(),
    }


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def ram_gb() -> float | None:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    return None


def os_name() -> str:
    try:
        return platform.freedesktop_os_release()["PRETTY_NAME"]
    except OSError:
        return platform.platform()


def redis_version() -> str:
    found = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    )
    for word in found.stdout.split():
        if word.startswith("v="):
            return word[2:]
    return found.stdout.strip()


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "django_apee", "bench")
    return git("rev-parse", "--short", "HEAD") + (" (+ local changes)" if dirty else "")


def load() -> str:
    return " ".join(f"{n:.2f}" for n in os.getloadavg())


def run_script(name: str, args: list[str], json_out: Path) -> dict[str, Any]:
    """Run one bench script as its own process; its stdout report is echoed."""
    command = [sys.executable, str(HERE / name), *args, "--json", str(json_out)]
    print(f"\n$ {shlex.join(command)}", flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True, cwd=ROOT)
    report: dict[str, Any] = json.loads(json_out.read_text())
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    parser.add_argument("--storage-rounds", type=int, default=20)
    parser.add_argument("--storage-calls", type=int, default=200)
    parser.add_argument("--hot-seconds", type=float, default=10.0)
    parser.add_argument(
        "--stampede-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed on to stampede.py as is, e.g. --stampede-arg=--processes=2",
    )
    args = parser.parse_args()

    record: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "bench/run_all.py", *sys.argv[1:]]),
        "machine": machine(),
    }
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="apee-bench-") as tmp:
        record["storage"] = run_script(
            "storage.py",
            ["--rounds", str(args.storage_rounds), "--calls", str(args.storage_calls)],
            Path(tmp) / "storage.json",
        )
        record["stampede"] = run_script(
            "stampede.py",
            ["--hot-seconds", str(args.hot_seconds), *args.stampede_arg],
            Path(tmp) / "stampede.json",
        )
    record["machine"]["load_after"] = load()
    record["seconds"] = round(time.monotonic() - began, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(record, indent=1, default=str))

    from charts import draw_all  # matplotlib only once there is something to draw

    print(f"\nRecorded in {record['seconds']} s:", file=sys.stderr)
    for path in [args.out / "results.json", *draw_all(record, args.out)]:
        print(f"  {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
