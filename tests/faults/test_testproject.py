"""The demo site builds its caches without talking to Redis."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.redis_server import free_port

pytestmark = pytest.mark.faults

TESTPROJECT = Path(__file__).resolve().parents[2] / "testproject"


def test_manage_py_check_passes_with_redis_unreachable():
    env = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=TESTPROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout
