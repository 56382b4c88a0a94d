"""What a private redis-server runs, watched with MONITOR.

Use it on a server whose only clients are the test's: MONITOR shows every
client's commands. Commands a Lua script runs come right after the script's
call, with ``client_type`` ``lua``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from django_apee.store import scripts
from tests.support.redis_server import RedisServer

#: What redis-py may send when it opens a connection.
HANDSHAKE = {"HELLO", "CLIENT", "AUTH", "SELECT"}

Seen = list[dict[str, Any]]


@contextmanager
def monitored(server: RedisServer) -> Iterator[Seen]:
    """Every command the server runs meanwhile, as redis-py's MONITOR parses
    them (``command``, ``client_type``...)."""
    watcher = redis.Redis(port=server.port, socket_timeout=30)
    stop = f"stop-{uuid.uuid4()}"
    seen: Seen = []
    with watcher.monitor() as monitor:

        def read() -> None:
            while True:
                command = monitor.next_command()
                if command["command"] == f"ECHO {stop}":
                    return
                seen.append(command)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            yield seen
        finally:
            stopper = redis.Redis(port=server.port, socket_timeout=5)
            stopper.echo(stop)
            stopper.close()
            reader.join(30)
    watcher.close()


def words(command: dict[str, Any]) -> list[str]:
    return str(command["command"]).split(" ")


def background(command: dict[str, Any]) -> bool:
    """A command of the process's background threads, not of the call being
    watched: the fleet flush (``TIME``, then ``stats.lua``) and the Redis
    clock's samples (``TIME``) run on their own schedule and may land in any
    window."""
    name, *args = words(command)
    name = name.upper()
    return name == "TIME" or (
        name == "EVALSHA" and bool(args) and args[0] == scripts.script("stats").sha
    )


def client_commands(seen: Seen) -> set[str]:
    """The names of the commands clients sent, connection handshakes and
    background threads aside."""
    return {
        words(c)[0].upper()
        for c in seen
        if c["client_type"] != "lua" and not background(c)
    } - HANDSHAKE


def script_runs(seen: Seen, name: str) -> list[tuple[list[str], list[list[str]]]]:
    """Each EVALSHA of script ``name``, with the commands the script ran."""
    sha = scripts.script(name).sha
    runs: list[tuple[list[str], list[list[str]]]] = []
    inside = False
    for command in seen:
        if command["client_type"] == "lua":
            if inside:
                runs[-1][1].append(words(command))
            continue
        call = words(command)
        inside = call[0].upper() == "EVALSHA" and call[1] == sha
        if inside:
            runs.append((call, []))
    return runs
