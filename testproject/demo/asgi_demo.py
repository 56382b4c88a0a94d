"""The demo's ASGI part: an async view under uvicorn, the report cold.

For each configuration the demo site runs under uvicorn (``demo.asgi``, one
process, one event loop) and ``clients`` concurrent requests ask the async
report view (``/report-async.json``) while the report is absent. Counted:
how often the report was computed (``shop.reports.RUNS_KEY``), the answers,
the latency, and how many threads the server process added meanwhile (read
from ``/proc``, Linux only; in the JSON report, see ``line``).

On naive the view does the async cache-aside such views are written with
(``aget``; on a miss compute in a thread and ``aset``); on apee it awaits
``aget_or_set_stampede_safe``: one computation, the other requests waiting
on the event loop rather than in threads.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import redis

TESTPROJECT = Path(__file__).resolve().parent.parent
PATH = "/report-async.json"
RUNS_KEY = "demo:sales_report:runs"  # shop.reports.RUNS_KEY; no Django here


@dataclass
class AsgiResult:
    config: str
    requests: int
    ok: int
    computes: int
    threads_added: int | None
    p50_ms: float
    max_ms: float


def _get(port: int, path: str, timeout: float = 60.0) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _threads(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run(
    config: str,
    clients: int,
    port: int,
    env: dict[str, str],
    counter: redis.Redis,
    clear_keys: Callable[[redis.Redis], None],
) -> AsgiResult:
    """One configuration: start uvicorn, load the cold report, stop it."""
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in the finally below
        prefix=f"apee-demo-uvicorn-{config}-", suffix=".log", delete=False
    )
    process = subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", "demo.asgi:application",
            "--app-dir", str(TESTPROJECT), "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning", "--backlog", "1024",
        ],
        cwd=TESTPROJECT,
        env={**os.environ, **env, "DEMO_CACHE": config},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"uvicorn exited ({config}); see {log.name}")
            try:
                if _get(port, "/metrics", timeout=5) == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
        clear_keys(counter)  # the report is cold, no run counted yet
        before = _threads(process.pid)
        peak = before
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                now = _threads(process.pid)
                if now is not None and peak is not None:
                    peak = max(peak, now)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def one(_: int) -> tuple[int, float]:
            started = time.perf_counter()
            status = _get(port, PATH)
            return status, time.perf_counter() - started

        with ThreadPoolExecutor(max_workers=clients) as pool:
            answers = list(pool.map(one, range(clients)))
        done.set()
        sampler.join(5)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()
    latencies = sorted(seconds for _, seconds in answers)
    return AsgiResult(
        config=config,
        requests=len(answers),
        ok=sum(1 for status, _ in answers if status == 200),
        computes=int(counter.llen(RUNS_KEY)),
        threads_added=None if before is None or peak is None else peak - before,
        p50_ms=round(latencies[len(latencies) // 2] * 1000, 1),
        max_ms=round(latencies[-1] * 1000, 1),
    )


def line(naive: AsgiResult, apee: AsgiResult) -> str:
    """The comparison line the demo prints.

    Threads are not in it: Django's ASGI handler runs each request's sync
    middleware in a thread of its own (``ThreadSensitiveContext``), so the
    server's thread count follows the concurrent requests on both
    configurations; they are in the JSON report.
    """

    def part(label: str, result: AsgiResult) -> str:
        computes = (
            "1 compute" if result.computes == 1 else f"{result.computes} computes"
        )
        return (
            f"{label} {computes}, {result.ok}/{result.requests} ok, "
            f"p50 {result.p50_ms / 1000:.2f} s"
        )

    return (
        f"ASGI (uvicorn, an async view, {apee.requests} concurrent requests on a "
        f"cold report): {part('django-redis aget/aset:', naive)}; "
        f"{part('django-apee aget_or_set_stampede_safe:', apee)}"
    )
