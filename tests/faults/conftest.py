"""Fixtures shared by the fault tests."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from django.conf import settings
from django.core.cache import caches
from django.test import override_settings

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


@pytest.fixture
def cluster_alias(cluster) -> Iterator[Any]:
    """``cluster_alias(KEY_PREFIX=..., OPTIONS=...) -> alias``: a fresh CACHES
    alias on the cluster; top-level parameters as given."""
    with ExitStack() as stack:

        def make(**params: Any) -> str:
            alias = f"cluster-{uuid.uuid4().hex[:8]}"
            options = {
                "CLIENT_CLASS": "django_apee.cluster.ApeeClusterClient",
                **params.pop("OPTIONS", {}),
            }
            config = {
                "BACKEND": "django_apee.cache.ApeeCache",
                "LOCATION": cluster.urls,
                "OPTIONS": options,
                **params,
            }
            stack.enter_context(
                override_settings(CACHES={**settings.CACHES, alias: config})
            )
            return alias

        yield make


@pytest.fixture
def on_cluster(cluster_alias):
    """``on_cluster(**params) -> cache`` on a fresh alias (see ``cluster_alias``)."""
    return lambda **params: caches[cluster_alias(**params)]
