"""The live stampede demonstration: one site, two caches, the same load.

``scripts/demo`` runs this with the demo environment's Python; the tests run
it with theirs. Given ``REDIS_URL`` (and optionally ``DATABASE_URL``) it:

1. migrates and seeds the demo shop (both skip what is already done);
2. for ``naive`` (plain django-redis, ``cache.get_or_set``) and then
   ``apee`` (django-apee, ``get_or_set_stampede_safe``): starts the site
   under gunicorn (several gthread workers, a real multi-process fleet),
   fills the sales report once, then drives concurrent HTTP clients at it
   across several expiries of the cached report, printing progress every
   second;
3. prints both runs side by side: how many times the database ran the
   report's query per expiry, request latency (p50, p99, max) and errors;
   then ``manage.py apee_stats`` for the apee run;
4. leaves the apee site running until Ctrl-C, or with ``--no-serve`` stops.

Expensive queries are counted by the report itself (a Redis list of start
times, ``shop.reports.RUNS_KEY``), the same code on both configurations.
Runs less than ``--gap`` seconds apart belong to one expiry: a stampede
starts all its runs within a few milliseconds, and one expiry is seconds
from the next.

Nothing here sleeps in place of work, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Run as a script (scripts/demo): its folder is on sys.path.
import asgi_demo
import redis

TESTPROJECT = Path(__file__).resolve().parent.parent
RUNS_KEY = "demo:sales_report:runs"  # shop.reports.RUNS_KEY; no Django here
REPORT_PATH = "/report.json"
#: Keys the site leaves in Redis, deleted before each run. Never FLUSHDB:
#: REDIS_URL may be a Redis the user shares with other things.
KEY_PATTERNS = ("demo:*", "demo-naive:*", "{demo:*")
STATS_PATTERN = "django_apee:stats:{demo:*"  # the fleet counters apee_stats reads
LABELS = {"naive": "django-redis, get_or_set", "apee": "django-apee"}


@dataclass(frozen=True)
class Plan:
    """How big a demonstration to run."""

    clients: int
    seconds: float
    timeout: float  # the report's hard timeout
    soft: float  # its soft timeout (apee only)
    workers: int
    threads: int
    think: float = 0.05  # each client's pause between requests
    gap: float = 0.5  # runs further apart than this are separate expiries


FULL = Plan(clients=64, seconds=25, timeout=8, soft=6, workers=4, threads=8)
SHORT = Plan(clients=16, seconds=8, timeout=5, soft=4, workers=2, threads=4)


@dataclass
class Result:
    """One run's figures, as printed and as written with ``--json``."""

    config: str
    requests: int = 0
    errors: int = 0
    wrong: int = 0
    queries: int = 0
    expiries: int = 0
    per_expiry: list[int] = field(default_factory=list)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    slower_than_1s: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def queries_per_expiry(self) -> float:
        return self.queries / self.expiries if self.expiries else 0.0


def say(text: str = "") -> None:
    print(text, flush=True)


# --- the site -------------------------------------------------------------


def manage(*args: str, config: str = "apee") -> subprocess.CompletedProcess[str]:
    """Run ``manage.py`` with the demo's environment; output captured."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=TESTPROJECT,
        env={**os.environ, "DEMO_CACHE": config},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def prepare() -> None:
    for step in (("migrate", "--noinput", "-v", "0"), ("seed",)):
        done = manage(*step)
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {step[0]} failed:\n{done.stderr}")
        if done.stdout.strip():
            say(done.stdout.strip())


class Site:
    """The demo site under gunicorn, stopped by its PID."""

    def __init__(self, config: str, plan: Plan, port: int) -> None:
        self.config = config
        self.port = port
        self.workdir = tempfile.mkdtemp(prefix=f"apee-demo-{config}-")
        self.log_path = os.path.join(self.workdir, "gunicorn.log")
        multiproc = os.path.join(self.workdir, "prometheus")
        os.mkdir(multiproc)
        env = {
            **os.environ,
            "DEMO_CACHE": config,
            "DEMO_REPORT_TIMEOUT": str(plan.timeout),
            "DEMO_REPORT_SOFT": str(plan.soft),
            "PROMETHEUS_MULTIPROC_DIR": multiproc,
        }
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "demo.wsgi:application",
                    "--chdir",
                    str(TESTPROJECT),
                    "--bind",
                    f"127.0.0.1:{port}",
                    "--workers",
                    str(plan.workers),
                    "--worker-class",
                    "gthread",
                    "--threads",
                    str(plan.threads),
                    "--timeout",
                    "60",
                    "--graceful-timeout",
                    "10",
                ],
                cwd=TESTPROJECT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: Ctrl-C reaches the driver, which
                # stops gunicorn gracefully by PID.
                start_new_session=True,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as log:
            return log.read()[-3000:]

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.log_tail()}")
            try:
                status, _ = get(self.port, "/metrics", timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn did not answer in {timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM (workers flush their counters at exit), then SIGKILL."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def get(port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the load -------------------------------------------------------------


class Load:
    """Concurrent clients requesting the report until a deadline."""

    def __init__(self, port: int, plan: Plan, reference: list[Any]) -> None:
        self.port = port
        self.plan = plan
        self.reference = reference
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.wrong = 0
        self.stop_at = 0.0

    def client(self) -> None:
        """One client: keep-alive requests with a short pause between them."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while time.monotonic() < self.stop_at:
            started = time.monotonic()
            try:
                connection.request("GET", REPORT_PATH)
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                self.record(time.monotonic() - started, f"{type(error).__name__}")
                continue
            problem = None
            if response.status != 200:
                problem = f"HTTP {response.status}"
            elif json.loads(body)["rows"] != self.reference:
                problem = "wrong"
            self.record(time.monotonic() - started, problem)
            time.sleep(self.plan.think)
        connection.close()

    def record(self, seconds: float, problem: str | None) -> None:
        with self.lock:
            self.latencies.append(seconds)
            if problem == "wrong":
                self.wrong += 1
            elif problem:
                self.errors.append(problem)

    def run(self, config: str, counter: redis.Redis) -> None:
        """Run the clients; a progress line every second, one when done."""
        begun = time.monotonic()
        self.stop_at = begun + self.plan.seconds
        threads = [
            threading.Thread(target=self.client, daemon=True)
            for _ in range(self.plan.clients)
        ]
        for thread in threads:
            thread.start()
        tick = begun
        while any(thread.is_alive() for thread in threads):
            tick += 1.0
            for thread in threads:  # until the next tick, or all are done
                thread.join(timeout=max(0.0, tick - time.monotonic()))
            if tick <= self.stop_at:
                self.progress(config, f"{tick - begun:3.0f} s", counter)
            if time.monotonic() > self.stop_at + 45:
                raise RuntimeError("clients still busy 45 s after the load ended")
        self.progress(config, "done ", counter)

    def progress(self, config: str, when: str, counter: redis.Redis) -> None:
        with self.lock:
            done, errors = len(self.latencies), len(self.errors) + self.wrong
            slowest = max(self.latencies, default=0.0)
        say(
            f"  {config:5} {when}  {done:7,} requests  {counter.llen(RUNS_KEY):4} "
            f"DB queries  {errors:3} errors  slowest {slowest:6.2f} s"
        )


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def bursts(starts: list[float], gap: float) -> list[int]:
    """How many runs each expiry caused: runs closer than ``gap`` are one."""
    counts: list[int] = []
    previous = None
    for start in sorted(starts):
        if previous is None or start - previous > gap:
            counts.append(0)
        counts[-1] += 1
        previous = start
    return counts


# --- one run, both runs ---------------------------------------------------


def clear_keys(counter: redis.Redis, *, stats: bool = True) -> None:
    """Every key the demo wrote; with ``stats=False`` the fleet counters stay."""
    for pattern in (*KEY_PATTERNS, STATS_PATTERN) if stats else KEY_PATTERNS:
        batch = list(counter.scan_iter(match=pattern, count=1000))
        if batch:
            counter.delete(*batch)
    counter.delete(RUNS_KEY)


def keep_stats(counter: redis.Redis) -> None:
    clear_keys(counter, stats=False)


def run_config(config: str, plan: Plan, counter: redis.Redis) -> tuple[Result, Site]:
    """Start the site on ``config``, fill the report, load it; leave it running."""
    clear_keys(counter)
    site = Site(config, plan, free_port())
    try:
        site.wait_ready()
        status, body = get(site.port, REPORT_PATH, timeout=60)
        if status != 200:
            raise RuntimeError(f"{REPORT_PATH}: HTTP {status}\n{site.log_tail()}")
        reference = json.loads(body)["rows"]
        counter.delete(RUNS_KEY)  # the fill is not part of the load
        say(
            f"{LABELS[config]} on {site.url}: "
            f"{plan.clients} clients, {plan.seconds:.0f} s"
        )
        load = Load(site.port, plan, reference)
        load.run(config, counter)
        time.sleep(min(plan.gap * 2, 1.0))  # let a refresh started at the end land
    except BaseException:
        site.stop()
        raise
    starts = [float(s) for s in counter.lrange(RUNS_KEY, 0, -1)]
    per_expiry = bursts(starts, plan.gap)
    result = Result(
        config=config,
        requests=len(load.latencies),
        errors=len(load.errors),
        wrong=load.wrong,
        queries=len(starts),
        expiries=len(per_expiry),
        per_expiry=per_expiry,
        p50_ms=round(percentile(load.latencies, 0.50) * 1000, 1),
        p99_ms=round(percentile(load.latencies, 0.99) * 1000, 1),
        max_ms=round(max(load.latencies, default=0.0) * 1000, 1),
        slower_than_1s=sum(1 for s in load.latencies if s > 1.0),
        error_samples=sorted(set(load.errors))[:5],
    )
    return result, site


def compare_asgi(plan: Plan, counter: redis.Redis) -> dict[str, Any]:
    """The ASGI part (``asgi_demo.py``): an async view, the report cold."""
    env = {"DEMO_REPORT_TIMEOUT": str(plan.timeout), "DEMO_REPORT_SOFT": str(plan.soft)}
    clients = plan.clients * 4
    return {
        # The fleet counters of the gunicorn run stay for apee_stats below.
        config: asgi_demo.run(config, clients, free_port(), env, counter, keep_stats)
        for config in ("naive", "apee")
    }


def table(naive: Result, apee: Result, plan: Plan) -> str:
    def ms(value: float) -> str:
        return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"

    def spread(result: Result) -> str:
        if not result.per_expiry:
            return "-"
        return f"{min(result.per_expiry)}-{max(result.per_expiry)}"

    rows = [
        ("", LABELS["naive"], LABELS["apee"]),
        ("requests", f"{naive.requests:,}", f"{apee.requests:,}"),
        ("expiries (bursts of recompute)", str(naive.expiries), str(apee.expiries)),
        ("DB queries (the report's)", str(naive.queries), str(apee.queries)),
        (
            "DB queries per expiry",
            f"{naive.queries_per_expiry:.1f}",
            f"{apee.queries_per_expiry:.1f}",
        ),
        ("  fewest-most in one expiry", spread(naive), spread(apee)),
        ("latency p50", ms(naive.p50_ms), ms(apee.p50_ms)),
        ("latency p99", ms(naive.p99_ms), ms(apee.p99_ms)),
        ("latency max", ms(naive.max_ms), ms(apee.max_ms)),
        (
            "requests slower than 1 s",
            str(naive.slower_than_1s),
            str(apee.slower_than_1s),
        ),
        ("errors", str(naive.errors), str(apee.errors)),
        ("wrong answers", str(naive.wrong), str(apee.wrong)),
    ]
    lines = [f"  {a:32}{b:>26}{c:>16}" for a, b, c in rows]
    lines.append(
        f"  ({plan.clients} clients, {plan.workers} gunicorn workers x "
        f"{plan.threads} threads, report cached {plan.timeout:g} s; "
        f"apee refreshes it from {plan.soft:g} s)"
    )
    return "\n".join(lines)


def show_stats() -> str:
    done = manage("apee_stats", config="apee")
    return (done.stdout + done.stderr).rstrip()


def serve(site: Site) -> None:
    say()
    say(f"The django-apee site is running: {site.url}/")
    say(f"  sales report {site.url}/report/   admin {site.url}/admin/ (demo / demo)")
    say(f"  metrics {site.url}/metrics")
    say("Press Ctrl-C to stop it (and the demo's private Redis).")
    while site.process.poll() is None:
        time.sleep(0.5)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="a small, fast run")
    parser.add_argument("--no-serve", action="store_true", help="stop when done")
    parser.add_argument("--json", metavar="PATH", help="also write the figures here")
    parser.add_argument("--clients", type=int, help="concurrent HTTP clients")
    parser.add_argument("--seconds", type=float, help="load per configuration")
    return parser.parse_args(argv)


def plan_from(args: argparse.Namespace) -> Plan:
    plan = SHORT if args.short else FULL
    changes = {
        name: getattr(args, name)
        for name in ("clients", "seconds")
        if getattr(args, name) is not None
    }
    return Plan(**{**asdict(plan), **changes})


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    plan = plan_from(args)
    if "REDIS_URL" not in os.environ:
        say("REDIS_URL is not set: scripts/demo starts a private redis-server.")
        return 2
    # SIGTERM (scripts/demo's Ctrl-C) unwinds like Ctrl-C: gunicorn is stopped.
    signal.signal(signal.SIGTERM, interrupt)
    counter = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=10)
    site = None
    try:
        started = time.monotonic()
        prepare()
        results = {}
        for config in ("naive", "apee"):
            results[config], site = run_config(config, plan, counter)
            if config == "naive":
                site.stop()
                site = None
        say()
        say(table(results["naive"], results["apee"], plan))
        asgi = compare_asgi(plan, counter)
        say()
        say(asgi_demo.line(asgi["naive"], asgi["apee"]))
        if args.no_serve:
            assert site is not None
            site.stop()  # its workers flush their counters as they exit
            site = None
        else:
            time.sleep(2.5)  # two of the site's 1 s STATS_FLUSH_INTERVAL, and a bit
        say()
        say("manage.py apee_stats, after the django-apee run:")
        say(show_stats())
        say()
        say(f"demo finished in {time.monotonic() - started:.0f} s")
        if args.json:
            with open(args.json, "w") as out:
                json.dump(
                    {
                        "plan": asdict(plan),
                        "runs": {
                            name: {
                                **asdict(r),
                                "queries_per_expiry": r.queries_per_expiry,
                            }
                            for name, r in results.items()
                        },
                        "asgi": {name: asdict(r) for name, r in asgi.items()},
                    },
                    out,
                    indent=2,
                )
        if site is not None:
            serve(site)
    except KeyboardInterrupt:
        say("\nstopping")
    finally:
        if site is not None:
            site.stop()
        counter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
