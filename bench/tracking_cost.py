"""What BCAST tracking costs Redis: CPU per write with N near-cache processes.

Every process with a near cache holds one ``CLIENT TRACKING ON BCAST PREFIX``
connection, so each write under the prefix is pushed to every one of them.
This measures what that fan-out costs the server: ``--writes`` SETs of
~200 B values under the tracked prefix (pipelined, one client), with 0, 8
and 32 tracking connections, each in a child process that drains its
socket as fast as it arrives; the figure is Redis's own CPU time (INFO
``used_cpu_user`` + ``used_cpu_sys``) per write, and the writer's wall time.
Interleaved rounds; medians.

Run::

    python bench/tracking_cost.py [--writes 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from tests.support.redis_server import RedisServer

PREFIX = "app:"
TRACKERS = (0, 8, 32)


def drain(port: int, count: int) -> None:
    """Child: ``count`` BCAST tracking connections, drained until stdin closes."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"HELLO 3\r\n")
        time.sleep(0.01)
        sock.recv(65536)
        sock.sendall(f"CLIENT TRACKING ON BCAST PREFIX {PREFIX}\r\n".encode())
        sock.setblocking(False)
        sockets.append(sock)
    print("READY", flush=True)
    import selectors

    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is sys.stdin:
                return
            with contextlib.suppress(BlockingIOError):
                key.fileobj.recv(1 << 20)  # type: ignore[union-attr]


def cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def one_round(
    client: redis.Redis, port: int, trackers: int, writes: int
) -> tuple[float, float]:
    child = None
    if trackers:
        child = subprocess.Popen(
            [sys.executable, __file__, "--drain", str(port), str(trackers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "READY"
    value = b"x" * 200
    try:
        before = cpu(client)
        began = time.perf_counter()
        pipeline = client.pipeline(transaction=False)
        for i in range(writes):
            pipeline.set(f"{PREFIX}{i % 1000}", value)
            if i % 100 == 99:
                pipeline.execute()
        pipeline.execute()
        wall = time.perf_counter() - began
        time.sleep(0.2)  # let the pushes leave
        used = cpu(client) - before
    finally:
        if child is not None:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(timeout=30)
    return used / writes * 1e6, wall / writes * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--drain", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drain:
        drain(int(args.drain[0]), int(args.drain[1]))
        return
    server = RedisServer().start()
    try:
        client = redis.Redis.from_url(server.url)
        cpu_us: dict[int, list[float]] = {n: [] for n in TRACKERS}
        wall_us: dict[int, list[float]] = {n: [] for n in TRACKERS}
        for _ in range(args.rounds):
            for trackers in TRACKERS:
                used, wall = one_round(client, server.port, trackers, args.writes)
                cpu_us[trackers].append(used)
                wall_us[trackers].append(wall)
        print("trackers   Redis CPU µs/write   writer µs/write (pipelined)")
        for trackers in TRACKERS:
            print(
                f"{trackers:8}   {statistics.median(cpu_us[trackers]):18.2f}"
                f"   {statistics.median(wall_us[trackers]):12.2f}"
            )
    finally:
        server.close()


if __name__ == "__main__":
    main()
