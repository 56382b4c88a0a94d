"""The stampede demonstration, end to end, in its short mode.

Real processes and real HTTP: the driver (``testproject/demo/stampede_demo.py``,
what ``scripts/demo`` runs) migrates and seeds an SQLite file of its own,
serves the demo shop under gunicorn on plain django-redis and then on
django-apee, drives concurrent clients at the cached report across its
expiries, and writes its figures as JSON. We check the figures it prints:
django-apee ran the report's query once per expiry, the naive setup more than
once, and every answer was the right report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "testproject" / "demo" / "stampede_demo.py"


def test_short_demo_computes_once_per_expiry_on_apee_only(redis_url, tmp_path):
    figures = tmp_path / "demo.json"
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)  # the demo site has its own
    done = subprocess.run(
        [sys.executable, str(DRIVER), "--short", "--no-serve", "--json", str(figures)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(figures.read_text())
    runs = report["runs"]
    # The ASGI part: an async view under uvicorn, the report cold.
    asgi = report["asgi"]
    assert asgi["apee"]["computes"] == 1
    assert asgi["apee"]["ok"] == asgi["apee"]["requests"] > 1
    assert asgi["naive"]["ok"] == asgi["naive"]["requests"]
    assert "ASGI (uvicorn" in done.stdout
    naive, apee = runs["naive"], runs["apee"]

    # django-apee: one run of the query for every expiry the load went through.
    assert apee["expiries"] >= 1
    assert apee["per_expiry"] == [1] * apee["expiries"]
    assert apee["queries"] == apee["expiries"]
    # plain django-redis: the same load made the database run it more often.
    assert naive["expiries"] >= 1
    assert naive["queries"] > naive["expiries"]
    assert max(naive["per_expiry"]) > 1
    # Every answer was a 200 with the right report, on both.
    for run in (naive, apee):
        assert run["requests"] > 0
        assert run["errors"] == 0, run["error_samples"]
        assert run["wrong"] == 0
    # What it printed: the side-by-side table and apee_stats.
    assert "DB queries per expiry" in done.stdout
    assert "cache 'default'" in done.stdout
