"""redis-server processes that ``RedisServer`` cannot start as is: TLS, Sentinel.

Used by ``tests/redis/test_compat.py``. Both reuse ``RedisServer``'s lifecycle
(``start``/``close`` by PID, a private temp dir); only how the process is
started or probed differs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.support.redis_server import RedisServer, redis_server_binary


def self_signed_cert(directory: Path) -> tuple[str, str]:
    """Write a throwaway self-signed certificate for 127.0.0.1; return paths."""
    cert, key = directory / "redis.crt", directory / "redis.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


def tls_unsupported_reason(cert: str) -> str | None:
    """Say why this redis-server cannot serve TLS, or None if it can.

    A build without TLS rejects ``tls-cert-file`` as a bad directive; one with
    TLS accepts it and stops at the deliberately invalid ``loglevel`` instead.
    Nothing is started.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        return "redis-server is not installed"
    probe = subprocess.run(
        [binary, "--port", "0", "--tls-cert-file", cert, "--loglevel", "invalid"],
        capture_output=True,
        timeout=10,
    )
    output = (probe.stdout + probe.stderr).decode(errors="replace")
    if "tls-cert-file" in output:
        return "redis-server was built without TLS support (BUILD_TLS=no)"
    return None


class ProbedRedisServer(RedisServer):
    """A redis-server whose readiness PING needs client options (TLS, a password)."""

    def __init__(
        self, extra_args: tuple[str, ...] = (), **client_kwargs: object
    ) -> None:
        super().__init__(extra_args=extra_args, **client_kwargs)


class TLSRedisServer(ProbedRedisServer):
    """A redis-server that speaks TLS only (``--port 0 --tls-port P``)."""

    def __init__(self, cert: str, key: str) -> None:
        super().__init__(ssl=True, ssl_cert_reqs="none")
        # RedisServer passes ``--port P`` first; the later ``--port 0`` wins.
        self.extra_args = (
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-ca-cert-file",
            cert,
            "--tls-auth-clients",
            "no",
        )

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"


class SentinelServer(RedisServer):
    """``redis-server <conf> --sentinel`` monitoring one primary as ``name``."""

    def __init__(self, primary_port: int, name: str = "mymaster") -> None:
        super().__init__()
        self.primary_port = primary_port
        self.name = name

    def command(self) -> list[str]:
        conf = Path(self.dir) / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.dir}\n"
            f"logfile {os.path.join(self.dir, 'sentinel.log')}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self.primary_port} 1\n"
            f"sentinel down-after-milliseconds {self.name} 60000\n"
        )
        return [redis_server_binary(), str(conf), "--sentinel"]
