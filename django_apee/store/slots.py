"""Redis Cluster: keys grouped by hash slot, and a pipeline that survives NOSCRIPT.

A Lua script may only touch keys of one hash slot on a cluster, so every
multi-key script call (``get_many``'s ``lua/get.lua``) is made per slot:
``by_slot`` groups a list of keys by slot, keeping the callers' order inside
each group, and cuts groups to a maximum size.

redis-py's ``ClusterPipeline`` refuses ``evalsha`` (8.1 blocks it) but sends
``execute_command("EVALSHA", ...)``; and unlike a plain pipeline it does not
load a script that a node answers NOSCRIPT for. A node answers NOSCRIPT
whenever it never ran the script: a replica promoted by a failover, a primary
added by resharding, one restarted or after ``SCRIPT FLUSH``. ``Cluster`` is
a ``RedisCluster`` whose pipelines (``NoScriptPipeline``) remember what they
sent; when a result is NOSCRIPT for one of our scripts, the script is loaded
on every primary and the calls that met NOSCRIPT (they did not run) are sent
again, once. Every call runs exactly once, whatever node it lands on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from redis.cluster import ClusterPipeline, RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError


def slot_of(key: str | bytes) -> int:
    """The hash slot (0-16383) of ``key``, by its hash tag if it has one."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


def by_slot(keys: Sequence[str | bytes], most: int) -> list[list[int]]:
    """Indices of ``keys`` grouped by hash slot, at most ``most`` per group.

    Groups come in the order of their slot's first key; inside a group the
    keys keep their order. Each group can be one script call.
    """
    groups: dict[int, list[list[int]]] = {}
    for index, key in enumerate(keys):
        chunks = groups.setdefault(slot_of(key), [[]])
        if len(chunks[-1]) >= most:
            chunks.append([])
        chunks[-1].append(index)
    return [chunk for chunks in groups.values() for chunk in chunks]


def supports_sharded_pubsub(cluster: RedisCluster) -> bool:
    """Whether every primary runs Redis/Valkey 7 or later (SPUBLISH).

    Valkey reports ``redis_version`` 7.2.4 for compatibility, so the field
    reads the same on both.
    """
    for node in cluster.get_primaries():  # type: ignore[no-untyped-call]
        info = cluster.get_redis_connection(node).info("server")
        major = str(info.get("redis_version", "0")).split(".")[0]
        if not major.isdigit() or int(major) < 7:
            return False
    return True


#: Resolves a script's SHA-1 to its source, or None if it is not one of ours
#: (``scripts.source_of``; passed in so this module needs no script list).
SourceOf = Callable[[str], "bytes | None"]


class NoScriptPipeline(ClusterPipeline):
    """A cluster pipeline that loads a script a node lacks and resends its calls."""

    def __init__(self, *args: Any, parent: Cluster, **kwargs: Any) -> None:
        self._sent: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._parent = parent
        super().__init__(*args, **kwargs)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self._sent.append((args, kwargs))
        return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]

    def reset(self) -> Any:
        self._sent = []
        return super().reset()  # type: ignore[no-untyped-call]

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        sent = self._sent
        results: list[Any] = list(super().execute(raise_on_error=False))
        missed = [
            i
            for i, one in enumerate(results)
            if isinstance(one, NoScriptError) and i < len(sent)
        ]
        if missed:
            self._resend(sent, results, missed)
        if raise_on_error:
            for one in results:
                if isinstance(one, Exception):
                    raise one
        return results

    def _resend(
        self,
        sent: list[tuple[tuple[Any, ...], dict[str, Any]]],
        results: list[Any],
        missed: list[int],
    ) -> None:
        """Load the scripts that met NOSCRIPT everywhere; send those calls again."""
        sources: dict[str, bytes] = {}
        again = []
        for i in missed:
            args = sent[i][0]
            if len(args) > 1 and str(args[0]).upper() == "EVALSHA":
                source = self._parent.source_of(str(args[1]))
                if source is not None:
                    sources[str(args[1])] = source
                    again.append(i)
        if not again:
            return
        for source in sources.values():
            self._parent.script_load(source)  # every primary
        pipeline = self._parent.pipeline(recover=False)
        for i in again:
            args, kwargs = sent[i]
            pipeline.execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]
        for i, one in zip(again, pipeline.execute(raise_on_error=False), strict=True):
            results[i] = one


class Cluster(RedisCluster):
    """A RedisCluster whose pipelines recover from NOSCRIPT (``NoScriptPipeline``).

    ``source_of`` names the scripts it may load: those of ``scripts.py``.
    """

    def __init__(self, *args: Any, source_of: SourceOf, **kwargs: Any) -> None:
        self.source_of = source_of
        #: What it was built from: the async twin is built from the same
        #: (``store/aio/cluster.py``).
        self.build_kwargs = dict(kwargs)
        super().__init__(*args, **kwargs)

    def pipeline(
        self, transaction: Any = None, shard_hint: Any = None, *, recover: bool = True
    ) -> ClusterPipeline:
        if transaction or shard_hint or not recover:
            plain: ClusterPipeline = super().pipeline(  # type: ignore[no-untyped-call]
                transaction=transaction, shard_hint=shard_hint
            )
            return plain
        return NoScriptPipeline(
            parent=self,
            nodes_manager=self.nodes_manager,
            commands_parser=self.commands_parser,
            startup_nodes=self.nodes_manager.startup_nodes,
            result_callbacks=self.result_callbacks,
            cluster_response_callbacks=self.cluster_response_callbacks,
            read_from_replicas=self.read_from_replicas,
            load_balancing_strategy=self.load_balancing_strategy,
            reinitialize_steps=self.reinitialize_steps,
            retry=self.retry,
            lock=self._lock,
            event_dispatcher=self._event_dispatcher,
        )

    def primaries(self) -> list[Any]:
        """The primaries the client knows now (one per shard)."""
        return list(self.get_primaries())  # type: ignore[no-untyped-call]
