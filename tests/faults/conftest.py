"""Fixtures shared by the fault tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
