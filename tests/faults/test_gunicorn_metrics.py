"""gunicorn with two workers and PROMETHEUS_MULTIPROC_DIR: /metrics sums them.

Real processes, real HTTP: a rendezvous makes sure each sync worker served at
least one request, then plain requests go wherever gunicorn sends them; the
counters on /metrics (django_apee.contrib.prometheus, multiprocess collector) are
the exact sums, and the fleet hash in Redis holds the same after the workers
exit (their at-exit flush).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.core.cache import caches
from prometheus_client.parser import text_string_to_metric_families

from django_apee.store import fleet
from tests.support.redis_server import free_port

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[2]


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        body: bytes = response.read()
    return body


def wait_ready(base: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, "gunicorn exited"
        try:
            if fetch(f"{base}/health") == b"ok":
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("gunicorn did not answer within 60 s")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for one in family.samples:
            found[(one.name, tuple(sorted(one.labels.items())))] = one.value
    return found


@pytest.fixture
def gunicorn() -> object:
    with tempfile.TemporaryDirectory(prefix="apee-prom-") as multiproc:
        port = free_port()
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.support.metrics_app",
            "PROMETHEUS_MULTIPROC_DIR": multiproc,
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), os.environ.get("PYTHONPATH", "")]
            ),
        }
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--workers",
                "2",
                "--worker-class",
                "sync",
                "--bind",
                f"127.0.0.1:{port}",
                "--graceful-timeout",
                "10",
                "tests.support.metrics_app:application",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, server)
            yield base, server
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait(timeout=10)


def test_metrics_are_summed_across_two_workers(gunicorn, raw_redis):
    base, server = gunicorn
    cache = caches["default"]
    # What earlier tests in this process counted lands now, not mid-test.
    fleet.flush()
    raw_redis.delete(fleet.stats_key(cache.key_prefix, "default"))
    cache.set("hot", "v", 300)
    raw_redis.delete("rendezvous")
    with ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(
                lambda _: json.loads(fetch(f"{base}/rendezvous?n=2&key=hot")),
                range(2),
            )
        )
    assert len({answer["pid"] for answer in answers}) == 2  # both workers served
    assert all(answer["found"] == "v" for answer in answers)
    with ThreadPoolExecutor(4) as pool:
        hits = list(pool.map(lambda _: fetch(f"{base}/get?key=hot"), range(30)))
        misses = list(pool.map(lambda _: fetch(f"{base}/get?key=cold"), range(12)))
    assert all(json.loads(body)["found"] == "v" for body in hits)
    assert all(json.loads(body)["found"] is None for body in misses)

    found = samples(fetch(f"{base}/metrics").decode())
    default = (("cache", "default"),)
    assert found[("apee_cache_hits_total", default)] == 32
    assert found[("apee_cache_misses_total", default)] == 12
    redis_backend = (("backend", "redis"),)
    assert found[("django_cache_get_hits_total", redis_backend)] == 32
    assert found[("django_cache_get_total", redis_backend)] == 44

    # The workers flush the fleet counters as they exit.
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)
    stored = raw_redis.hgetall(fleet.stats_key(cache.key_prefix, "default"))
    assert {k.decode(): int(v) for k, v in stored.items() if k != b"_since"} == {
        "hits": 32,
        "misses": 12,
    }
