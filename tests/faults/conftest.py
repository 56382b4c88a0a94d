"""Fixtures shared by the fault tests."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.children import Child
from tests.support.deployments import ClusterDeployment


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterDeployment]:
    """A Redis Cluster of the module's own (a module may kill its nodes)."""
    deployment = ClusterDeployment()
    try:
        deployment.start()
        print(f"cluster ready in {deployment.startup_seconds:.2f}s")
        yield deployment
    finally:
        deployment.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Child]]:
    """``spawn(**spec)``: a ``stampede_worker`` process; every one still
    alive at the end is killed (a stopped one is continued first)."""
    started: list[Child] = []

    def start(**spec: Any) -> Child:
        worker = Child("tests.support.stampede_worker", json.dumps(spec))
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            os.kill(worker.proc.pid, signal.SIGCONT)
        worker.kill()
