"""django-cachalot on an ApeeCache alias, as docs/howto/cachalot-sessions.rst says.

cachalot stamps each table with a timestamp key and serves a cached query
only if it is newer than every table it reads; a table key it finds missing
is stamped anew, which outdates every cached query on the table. The guide
claims: an early herd miss on a table key would start a stampede (every
query on the table run again), and either of its two setups (an alias with
herd mode off, or prefixed table keys in ``HERD_EXCLUDE``) prevents it, as
does cachalot's default of no timeout at all; a write still invalidates.

Each setup runs in a child process (``tests/support/cachalot_worker.py``,
which says why and what the timeline is), all four at once, against this
session's Redis and SQLite file. The ``unprotected`` setup is the control:
it must show the stampede the others prevent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("cachalot")

ROOT = Path(__file__).resolve().parents[2]
SETUPS = ["herd-off", "exclude", "no-timeout", "unprotected"]


def run_children() -> dict[str, dict[str, Any]]:
    procs = {
        setup: subprocess.Popen(
            [sys.executable, "-m", "tests.support.cachalot_worker", setup],
            cwd=ROOT,
            env=os.environ.copy(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for setup in SETUPS
    }
    reports: dict[str, dict[str, Any]] = {}
    for setup, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
            raise
        assert proc.returncode == 0, f"{setup}: {err[-3000:]}"
        reports[setup] = json.loads(out.strip().splitlines()[-1])
    return reports


@pytest.mark.django_db(transaction=True)
def test_cachalot_table_keys_are_not_missed_early_and_writes_invalidate():
    reports = run_children()
    for setup, report in reports.items():
        one = [f"{setup}-1"]
        # cachalot works through the alias: run once, then from the cache.
        assert report["first"] == [[one, 1], [1, 1]], setup
        assert report["cached"] == [[one, 0], [1, 0]], setup
        # A write outdates the cached query: the new row is read back.
        assert report["after_write"] == [[f"{setup}-1", f"{setup}-2"], 1], setup
        # cachalot does not know ApeeCache's class path: the guide says to
        # silence this warning.
        assert report["checks"] == ["cachalot.W001"], setup
    # The guide's setups: the stale table key is served, the fresh cached
    # results with it, no query runs.
    for setup in ("herd-off", "exclude", "no-timeout"):
        assert reports[setup]["table_stale"] == [[[f"{setup}-1"], 0], [1, 0]]
    # Without them, the reader that wins the stale table key's lease misses
    # it; cachalot stamps the table again, and every cached query on it runs
    # again, though none of them was stale.
    assert reports["unprotected"]["table_stale"] == [[["unprotected-1"], 1], [1, 1]]
