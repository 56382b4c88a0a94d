"""A TCP proxy on loopback that injects network faults between client and server.

Threads and sockets only. Every socket has a timeout and every loop checks a
closed flag at least every ``TICK`` seconds, so ``close()`` returns within a
bounded time even when a peer is stuck; threads are daemons and joined with
a timeout.
"""

from __future__ import annotations

import collections
import contextlib
import select
import socket
import threading
import time

#: How often a waiting thread looks at the flags (select/accept timeouts).
TICK = 0.05
#: Longest a send may block (a peer that stopped reading): then the link drops.
#: It is the sockets' timeout; reads wait in ``select`` for at most ``TICK``.
SEND_TIMEOUT = 5.0
#: Longest ``close`` waits for each thread.
JOIN_TIMEOUT = 1.0
NORMAL, BLACKHOLE = "normal", "blackhole"


class _Direction:
    """One way of one connection: a reader stamps chunks, a writer sends them.

    Two threads, so a delay is latency (each chunk leaves ``delay`` seconds
    after it arrived) rather than throughput loss (a sleeping reader would
    make later chunks wait behind earlier ones).
    """

    def __init__(
        self, link: _Link, source: socket.socket, dest: socket.socket, name: str
    ) -> None:
        self.link, self.source, self.dest = link, source, dest
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.ready = threading.Condition()
        self.threads = [
            threading.Thread(target=self._read, name=f"{name}-read", daemon=True),
            threading.Thread(target=self._write, name=f"{name}-write", daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _read(self) -> None:
        proxy = self.link.proxy
        while not self.link.closed:
            try:
                readable, _, _ = select.select([self.source], [], [], TICK)
                if not readable:
                    continue
                data = self.source.recv(65536)
            except (OSError, ValueError):  # closed under us, or reset
                break
            if proxy.mode == BLACKHOLE and data:
                self.link.tainted = True  # read, never forwarded
                continue
            with self.ready:
                self.queue.append(
                    (time.monotonic() + proxy.delay_seconds, data or None)
                )
                self.ready.notify()
            if not data:
                return  # EOF: the writer passes it on once the queue drains
        self.link.close()

    def _write(self) -> None:
        while not self.link.closed:
            with self.ready:
                if not self.queue:
                    self.ready.wait(TICK)
                    continue
                due, data = self.queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(min(TICK, wait))
                continue
            with self.ready:
                self.queue.popleft()
            if self.link.proxy.mode == BLACKHOLE:
                self.link.tainted = True  # in flight when the hole opened
                continue
            try:
                if data is None:
                    self.dest.shutdown(socket.SHUT_WR)
                    self.link.half_closed()
                    return
                self.dest.sendall(data)
            except OSError:
                break
        self.link.close()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: FaultyProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = False
        #: Bytes were dropped (blackhole): the Redis stream may be out of step.
        self.tainted = False
        self._halves = 0
        self._lock = threading.Lock()
        self.directions: list[_Direction] = []
        self.opener = threading.Thread(target=self._open, daemon=True)

    def _open(self) -> None:
        try:
            upstream = socket.create_connection(
                self.proxy.target, timeout=self.proxy.connect_timeout
            )
        except OSError:
            self.close()  # the server refuses: so does the proxy
            return
        with self._lock:
            if self.closed:
                upstream.close()
                return
            self.upstream = upstream
        for sock in (self.client, upstream):
            sock.settimeout(SEND_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.directions = [
            _Direction(self, self.client, upstream, "proxy-up"),
            _Direction(self, upstream, self.client, "proxy-down"),
        ]
        for direction in self.directions:
            direction.start()

    def half_closed(self) -> None:
        with self._lock:
            self._halves += 1
            done = self._halves == 2
        if done:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.proxy._forget(self)

    def threads(self) -> list[threading.Thread]:
        return [self.opener, *(t for d in self.directions for t in d.threads)]


class FaultyProxy:
    """``127.0.0.1:<port>`` forwarding to ``target``, with switchable faults.

    - ``delay(seconds)``: every chunk, either way, leaves ``seconds`` after it
      arrived; a request/reply round trip takes at least twice that.
    - ``cut()``: closes every live connection at once (both sides), whatever
      is in flight: the client sees the connection closed mid-command. New
      connections are accepted as before.
    - ``blackhole()``: connections stay open and what arrives is read and
      dropped, never forwarded nor answered, both ways: to a client, a
      frozen server. Only the client's own timeouts end its wait.
    - ``restore()``: no delay, no blackhole; connections that lost bytes to
      the blackhole are cut, because a request or a reply went missing and
      the Redis protocol on them would be out of step (a client would read
      the answer to an earlier command).

    Sockets send with a ``SEND_TIMEOUT`` bound and poll every ``TICK``;
    ``close()`` joins each thread for at most ``JOIN_TIMEOUT``.
    """

    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout: float = 1.0,
    ) -> None:
        self.target = (target_host, target_port)
        self.connect_timeout = connect_timeout
        self.mode = NORMAL
        self.delay_seconds = 0.0
        self.accepted = 0
        self._links: set[_Link] = set()
        self._finished: list[_Link] = []
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self._listener.settimeout(TICK)
        self.port = int(self._listener.getsockname()[1])
        self._acceptor = threading.Thread(
            target=self._accept, name="proxy-accept", daemon=True
        )

    def start(self) -> FaultyProxy:
        self._acceptor.start()
        return self

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._links)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            link = _Link(self, client)
            with self._lock:
                if self._closed:
                    client.close()
                    return
                self._links.add(link)
                self.accepted += 1
            link.opener.start()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)
            self._finished.append(link)

    def _live(self) -> list[_Link]:
        with self._lock:
            return list(self._links)

    # -- switches --------------------------------------------------------------

    def delay(self, seconds: float) -> None:
        self.delay_seconds = max(0.0, seconds)

    def blackhole(self) -> None:
        self.mode = BLACKHOLE

    def cut(self) -> int:
        """Close every live connection now; return how many there were."""
        links = self._live()
        for link in links:
            link.close()
        return len(links)

    def restore(self) -> None:
        self.mode = NORMAL
        self.delay_seconds = 0.0
        for link in self._live():
            if link.tainted:
                link.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        if self._acceptor.is_alive():
            self._acceptor.join(JOIN_TIMEOUT)
        self.cut()
        with self._lock:
            finished, self._finished = self._finished, []
        for link in finished:
            for thread in link.threads():
                if thread.is_alive():
                    thread.join(JOIN_TIMEOUT)
