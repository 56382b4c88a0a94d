"""A child process for multi-process tests, read line by line with bounds.

Children are ``python -m <module>`` with the test settings; they print
``READY`` once set up, wait for ``go`` on stdin, and end with a JSON report
line. Every read has a timeout, and a child that is still alive when its
test ends is killed (see ``kill``), so a hung child fails the test instead of
hanging the session.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class Child:
    """One child process running ``python -m module *args``."""

    def __init__(
        self, module: str, *args: str, env: dict[str, str] | None = None
    ) -> None:
        # Closed by ``kill``, after the process is gone.
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env={
                **os.environ,
                "DJANGO_SETTINGS_MODULE": "tests.settings",
                **(env or {}),
            },
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def line(self, timeout: float) -> str:
        """The next line it printed; an AssertionError if none comes in time."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"worker silent for {timeout}s: {self.errors()}"
            ) from None
        if not line:
            raise AssertionError(f"worker exited early: {self.errors()}")
        return line

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-3000:]

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.line(timeout).strip() == "READY"

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 30.0) -> dict[str, Any]:
        """Its JSON report line."""
        found: dict[str, Any] = json.loads(self.line(timeout))
        return found

    def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        """Its report, once it has exited cleanly (its background work done)."""
        report = self.result(timeout)
        returncode = self.proc.wait(timeout=timeout)
        assert returncode == 0, self.errors()
        return report

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.stderr.close()
