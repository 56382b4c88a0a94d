"""Hostile values in Redis: a ``get`` of them is a counted miss, never a crash.

Whoever can write to Redis can put any bytes under a key. Each case here
runs in its own child process (``tests/support/hostile_worker.py``) against
the session's redis-server: the child plants the bytes with a raw client,
reads them with ``cache.get`` through a real ApeeCache (default OPTIONS, and
``CODEC: "msgpack"``) and reports. Every case must end with exit code 0 (no
crash), no exception out of ``get``, the default returned (a miss) counted
once under one DecodeError reason, in under 2 s and 64 MiB of RSS growth.

Every envelope is authenticated and bound to its key (``core/wire.py``):
the bytes planted here get a valid MAC for the key they are planted under,
as a writer holding the worker's SECRET_KEY would write them, so that what
lies past the MAC is what is tested; the signature cases (bytes copied from
another key, a ``<script>`` without a valid MAC, in version 2's layout and as
version 1 wrote msgpack) are planted as they are.

Plain arrays nested 200 and 1,000 deep are no attack: msgpack's packer
writes up to 1,024 levels and its C unpacker reads them without recursion,
so they are legitimate values; they must come back as what they are, as
cheaply. The bytes are built by ``tests/support/hostile.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from django.conf import settings

from django_apee.core.envelope import DECODE_REASONS, DecodeError, Envelope
from django_apee.core.mac import derive_signing_keys
from tests.support import hostile
from tests.support.children import ROOT
from tests.support.hostile_worker import SECRET_KEY

pytestmark = pytest.mark.faults

WORKER = ROOT / "tests" / "support" / "hostile_worker.py"
OPTION_SETS = {"default": {}, "msgpack": {"CODEC": "msgpack"}}
MAX_SECONDS = 2.0
MAX_RSS_MIB = 64.0
#: The worker's MAC key (from its SECRET_KEY). Every planted envelope gets a
#: valid MAC for the key it is planted under, as a writer holding the key
#: would write it, so that the decoders behind the MAC are what is tested;
#: but the signature cases, which are about the MAC itself.
WORKER_MAC_KEY = derive_signing_keys([SECRET_KEY])[0]


def valid_envelope() -> bytes:
    """A typical cached value, msgpack and zstd-compressed."""
    rows = [
        {"id": i, "name": f"product {i}", "price": i * 1.5, "tags": ["a", "b"]}
        for i in range(200)
    ]
    writer = Envelope(
        codec="msgpack", pickle_fallback=False, signing_keys=[hostile.SIGNING_KEY]
    )
    data = writer.encode(rows, key=hostile.KEY)
    assert isinstance(data, bytes)
    assert data[3] & 0x0C, "not compressed"
    return data


def unreadable_seeds(damage: Callable[[bytes, int], bytes], count: int) -> list[int]:
    """The first ``count`` seeds whose damage this tree cannot decode.

    A flipped byte can land on another valid value; such seeds are skipped,
    deterministically, so every damaged case is a miss to expect. The damage
    is judged resealed, as it is planted.
    """
    envelope = Envelope(pickle_fallback=False, signing_keys=[hostile.SIGNING_KEY])
    valid = valid_envelope()
    found = []
    seed = 0
    while len(found) < count:
        seed += 1
        try:
            envelope.decode(hostile.reseal(damage(valid, seed)), key=hostile.KEY)
        except DecodeError:
            found.append(seed)
    return found


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], bytes] | None
    #: The DecodeError reason expected, or None: any one.
    reason: str | None = None
    #: Plain nesting depth that must come back as a value instead of a miss.
    hit_depth: int | None = None
    plant: str | None = None


def nesting(kind: str, depth: int) -> Callable[[], bytes]:
    return lambda: hostile.envelope(hostile.nested([(kind, depth)]))


def bomb(how: str, payload: Callable[[], bytes]) -> Callable[[], bytes]:
    return lambda: hostile.bomb(payload(), how)


def nils(mib: int) -> Callable[[], bytes]:
    return lambda: hostile.flat_elements(mib << 20)


def huge_value() -> bytes:
    """A 96 MiB bin (three times MAX_VALUE_BYTES), compressed to 3 KB."""
    size = 96 << 20
    return b"\xc6" + size.to_bytes(4, "big") + bytes(size)


def unsigned_script() -> bytes:
    """A msgpack envelope whose MAC is zeros (the writer has no key),
    carrying a SafeString ``<script>``."""
    tag = msgpack.ExtType(12, b"<script>alert(document.cookie)</script>")
    head = hostile.HEADER + b"\x00"
    return head + bytes(hostile.MAC_LEN) + msgpack.packb(tag)


def unsigned_script_v1() -> bytes:
    """The same ``<script>`` as version 1 wrote msgpack: no MAC at all."""
    tag = msgpack.ExtType(12, b"<script>alert(document.cookie)</script>")
    return b"\xc1\xa9\x01\x00" + msgpack.packb(tag)


def damaged(damage: Callable[[bytes, int], bytes], seed: int) -> Callable[[], bytes]:
    return lambda: damage(valid_envelope(), seed)


CASES = [
    Case("ext-200", nesting("tuple", 200), "corrupt"),
    Case("ext-1000", nesting("tuple", 1000), "corrupt"),
    # 670 KB of nesting: the copies of the first ~25 levels hit the size cap
    # before the depth cap is reached.
    Case("ext-100000", nesting("tuple", 100_000), "too_large"),
    Case("array-200", nesting("list", 200), hit_depth=200),
    Case("array-1000", nesting("list", 1000), hit_depth=1000),
    Case("array-100000", nesting("list", 100_000), "corrupt"),
    Case("zstd-bomb", hostile.issue_bomb, "too_large"),
    Case("zstd-bomb-under-cap", bomb("zstd", nils(24)), "too_large"),
    Case("zstd-bomb-nosize", bomb("zstd-nosize", nils(24)), "too_large"),
    Case(
        "zstd-small-arrays",
        bomb("zstd", lambda: hostile.small_arrays(1 << 20)),
        "too_large",
    ),
    Case(
        "zstd-empty-maps",
        bomb("zstd", lambda: hostile.flat_elements(2 << 20, b"\x80")),
        "too_large",
    ),
    Case("zlib-bomb", bomb("zlib", nils(40)), "too_large"),
    Case("lz4-bomb", bomb("lz4", nils(40)), "too_large"),
    Case("lz4-bomb-nosize", bomb("lz4-nosize", nils(40)), "too_large"),
    Case("huge-value", bomb("zstd", huge_value), "too_large"),
    *(
        Case(f"truncated-{seed}", damaged(hostile.truncated, seed))
        for seed in unreadable_seeds(hostile.truncated, 3)
    ),
    *(
        Case(f"flipped-{seed}", damaged(hostile.flipped, seed))
        for seed in unreadable_seeds(hostile.flipped, 3)
    ),
    Case("key-swap", None, "signature", plant="swap"),
    Case("unsigned-envelope", unsigned_script, "signature"),
    Case("unsigned-envelope-v1", unsigned_script_v1, "version"),
]
#: Cases about the MAC itself: planted as built, never resealed.
SIGNATURE_CASES = {"key-swap", "unsigned-envelope", "unsigned-envelope-v1"}


def run_case(
    case: Case,
    options: dict[str, Any],
    tmp_path: Path,
    env: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any] | None, str]:
    """(exit code, report or None, stderr) of one worker run."""
    spec: dict[str, Any] = {
        "redis": settings.REDIS_URL,
        "options": options,
        "key": f"hostile:{case.name}:{uuid.uuid4().hex[:8]}",
    }
    if case.plant == "swap":
        spec.update(plant="swap", source=f"{spec['key']}:source")
    else:
        assert case.build is not None
        data = case.build()
        if case.name not in SIGNATURE_CASES:
            # The worker's cache.make_key: no KEY_PREFIX, version 1.
            data = hostile.reseal(data, f":1:{spec['key']}", WORKER_MAC_KEY)
        data_file = tmp_path / f"{case.name}.bin"
        data_file.write_bytes(data)
        spec["data_file"] = str(data_file)
    proc = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(spec)],
        cwd=tmp_path,
        env=env or {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines else None
    return proc.returncode, report, proc.stderr[-3000:]


@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_value(case: Case, option_set: str, tmp_path: Path) -> None:
    code, report, stderr = run_case(case, OPTION_SETS[option_set], tmp_path)
    assert code == 0, f"the worker died (exit code {code}): {stderr}"
    assert report is not None, stderr
    assert Path(report["django_apee"]).is_relative_to(ROOT), report
    assert report["escaped"] is None, report
    assert report["seconds"] < MAX_SECONDS, report
    assert report["rss_growth_mib"] < MAX_RSS_MIB, report
    if case.hit_depth is not None:
        assert report["returned_default"] is False, report
        assert report["result"] == {"type": "list", "depth": case.hit_depth}
        assert report["errors"] == {}, report
        return
    assert report["returned_default"] is True, report
    ((reason, count),) = report["errors"].items()
    assert count == 1, report
    assert reason in DECODE_REASONS, report
    if case.reason is not None:
        assert reason == case.reason, report
