"""A private redis-server for tests, benchmarks and the demo.

Nothing here touches the machine's shared Redis on 6379: a server is started
on a free port with persistence off, and stopped by its PID. Faults are real:
``pause`` sends SIGSTOP, ``restart`` kills and starts again on the same port.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import TypeVar

import redis

S = TypeVar("S", bound="RedisServer")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """redis-server from PATH, or a RuntimeError that says what to do."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not installed (Debian: apt-get install redis-server), "
            "or set REDIS_URL to a Redis you own."
        )
    return binary


class RedisServer:
    """One redis-server process we own.

    ``start`` is ``launch`` (the process only) then ``wait_ready`` (a PING
    every 20 ms, bounded): a deployment of several (``nodes.launch_all``)
    launches them all before it waits for any.
    """

    def __init__(
        self,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        binary: str | None = None,
        **client_kwargs: object,
    ) -> None:
        self.port = port or free_port()
        self.extra_args = extra_args
        #: The executable; None: redis-server from PATH (``nodes.Node`` may
        #: choose valkey-server).
        self.binary = binary
        #: What a client needs to PING this server (TLS options, a password).
        self.client_kwargs = client_kwargs
        self.process: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="apee-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        """The server's command line: loopback only, persistence off."""
        return [
            self.binary or redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
            "--logfile",
            os.path.join(self.dir, "redis.log"),
            *self.extra_args,
        ]

    def launch(self: S) -> S:
        """Start the process without waiting for it to answer."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"the server on {self.port} is already running")
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return self

    def start(self: S, timeout: float = 10.0) -> S:
        self.launch()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(
            port=self.port,
            socket_connect_timeout=0.2,
            socket_timeout=0.5,
            **self.client_kwargs,  # type: ignore[arg-type]
        )
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log()[-500:]}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on {self.port} did not start")
                time.sleep(0.02)
        finally:
            client.close()

    def log(self) -> str:
        path = os.path.join(self.dir, "redis.log")
        if not os.path.exists(path):
            return ""
        with open(path, errors="replace") as log:
            return log.read()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()  # a stopped process cannot act on SIGKILL until resumed
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


_session: RedisServer | None = None


def session_server() -> RedisServer | None:
    """The server this test process started, or None when REDIS_URL is used."""
    return _session


def session_url() -> str:
    """Start the session's private server once per process tree; return its URL.

    Django reads the test settings before any conftest runs, so the settings
    module calls this. The URL goes into ``APEE_TEST_REDIS_URL`` so that
    child processes (multi-process tests) reuse the server instead of
    starting their own. With ``APEE_SERVER_BIN`` set (``valkey``, or a
    path) the server is that binary (``nodes.server_binary``).
    """
    global _session
    url = os.environ.get("APEE_TEST_REDIS_URL") or os.environ.get("REDIS_URL")
    if not url:
        if os.environ.get("APEE_SERVER_BIN"):
            from tests.support.nodes import Node

            _session = Node().start()
        else:
            _session = RedisServer().start()
        atexit.register(_session.close)
        url = _session.url
    os.environ["APEE_TEST_REDIS_URL"] = url
    return url
