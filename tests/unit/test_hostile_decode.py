"""Hostile bytes cannot crash decoding, nor make it balloon.

Whoever can write to Redis chooses what ``Envelope.decode`` reads. These tests
throw deep nesting (tuples, sets, frozensets, plain arrays and maps, mixes, up
to 100,000 levels) and compression bombs (zstd with and without a declared
size, zlib, lz4 frames) at it, and check that only ``DecodeError`` escapes,
that nothing beyond the depth caps decodes, and that nothing beyond the size
cap's element budget does (see ``django_apee/core/unpacking.py``).

Nestings with at most 120 tuples/sets run in this process: before the caps,
decoding crashed only from about 190 levels on. Deeper ones run in a child
process (``tests/support/decode_child.py``) in a thread with a 512 KiB
stack, so a segfault fails the example instead of ending the test run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from django_apee.core import codec, unpacking
from django_apee.core.envelope import DecodeError, Envelope
from tests.support import hostile
from tests.support.children import ROOT

DEFAULT_CAP = 32 * 1024 * 1024
CHILD_STACK = 512 * 1024
EXT = tuple(hostile.EXT_CODES)
NEAR_EXT_CAP = st.sampled_from([1, 2, 3, 63, 64, 65])
NEAR_PLAIN_CAP = st.sampled_from([1, 1022, 1023, 1024, 1025])


def reader(max_bytes: int = DEFAULT_CAP) -> Envelope:
    """An envelope that verifies ``hostile``'s MACs: what is tested lies past them."""
    return Envelope(
        pickle_fallback=False,
        signing_keys=[hostile.SIGNING_KEY],
        max_decompressed_bytes=max_bytes,
    )


def decode(data: bytes, max_bytes: int = DEFAULT_CAP) -> set[str]:
    """What decoding gives: {"ok"} or {reason}; anything else escapes."""
    try:
        reader(max_bytes).decode(data, key=hostile.KEY)
    except DecodeError as error:
        return {error.reason}
    return {"ok"}


def check_nesting(layers: list[tuple[str, int]], max_bytes: int) -> None:
    envelope = reader(max_bytes)
    expected = hostile.outcome(layers, max_bytes)
    reason = value = None
    try:
        data = hostile.envelope(hostile.nested(layers))
        value = envelope.decode(data, key=hostile.KEY).value
    except DecodeError as error:
        reason = error.reason
    event(f"decoded: {reason or 'ok'}")
    if reason is not None:
        assert reason in expected, layers
    else:
        assert expected == {"ok"}, f"decoded beyond the caps: {layers}"
        assert hostile.matches(value, layers)


# -- depth, in this process -------------------------------------------------------

plain_run = st.tuples(
    st.sampled_from(hostile.PLAIN), st.integers(1, 100_000) | NEAR_PLAIN_CAP
)
shallow_ext_run = st.tuples(st.sampled_from(EXT), st.integers(1, 40) | NEAR_EXT_CAP)
shallow_layers = st.lists(plain_run | shallow_ext_run, min_size=1, max_size=6).filter(
    lambda layers: (
        hostile.depths(layers)[0] <= 120
        and sum(count for _, count in layers) <= 100_000
    )
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(layers=shallow_layers, max_bytes=st.sampled_from([64 * 1024, DEFAULT_CAP]))
@example(layers=[("tuple", 64)], max_bytes=DEFAULT_CAP)
@example(layers=[("frozenset", 65)], max_bytes=DEFAULT_CAP)
@example(layers=[("set", 1), ("frozenset", 63)], max_bytes=DEFAULT_CAP)
@example(layers=[("list", 1024)], max_bytes=DEFAULT_CAP)
@example(layers=[("map", 1025)], max_bytes=DEFAULT_CAP)
@example(layers=[("tuple", 1), ("list", 1023)], max_bytes=DEFAULT_CAP)
@example(layers=[("tuple", 1), ("list", 1024)], max_bytes=DEFAULT_CAP)
@example(layers=[("list", 1000), ("tuple", 64), ("map", 1000)], max_bytes=DEFAULT_CAP)
@example(layers=[("list", 100_000)], max_bytes=DEFAULT_CAP)
def test_nesting_in_process(layers: list[tuple[str, int]], max_bytes: int) -> None:
    check_nesting(layers, max_bytes)


@pytest.mark.parametrize("kind", EXT)
def test_the_ext_cap_is_the_encoders(kind: str) -> None:
    assert hostile.MAX_EXT_NESTING == codec.MAX_EXT_NESTING == 64
    value: Any = ()
    for _ in range(63):
        value = (value,)  # 64 tuples
    assert codec.unpack(codec.pack_value(value)) == value
    assert decode(hostile.envelope(hostile.nested([(kind, 64)]))) == (
        {"corrupt"} if kind == "set" else {"ok"}  # a set in a set: unhashable
    )
    assert decode(hostile.envelope(hostile.nested([("frozenset", 65)]))) == {"corrupt"}


def test_the_plain_cap_is_msgpacks() -> None:
    assert hostile.MSGPACK_MAX_NESTING == unpacking.MSGPACK_MAX_NESTING
    deepest: Any = None
    for _ in range(unpacking.MSGPACK_MAX_NESTING):
        deepest = [deepest]
    assert hostile.depth_of(codec.unpack(msgpack.packb(deepest))) == 1024
    with pytest.raises(ValueError):
        msgpack.packb([deepest])  # the packer stops where the unpacker does
    with pytest.raises(Exception, match="nested more than 1024 deep"):
        codec.unpack(hostile.nested([("list", 1025)]))


def test_a_deep_unpacker_that_failed_is_not_reused() -> None:
    good = hostile.envelope(hostile.nested([("tuple", 10)]))
    assert decode(good) == {"ok"}
    # A tenth tuple (a pooled Unpacker's depth) whose data has trailing bytes,
    # stops short, or declares two items and holds one.
    for bad in (b"\x91\xc0\xc0", b"\x91", b"\x92\xc0"):
        tenth = hostile.ext_header(hostile.EXT_CODES["tuple"], len(bad)) + bad
        data = hostile.envelope(hostile.nested([("tuple", 9)], tenth))
        assert decode(data) == {"corrupt"}
        assert decode(good) == {"ok"}


def test_deep_decoding_from_many_threads() -> None:
    value: Any = "x"
    for depth in range(40):
        value = (depth, value, frozenset({depth}))
    data = reader().encode(value, key=hostile.KEY)
    assert isinstance(data, bytes)
    wrong: list[Any] = []

    def read() -> None:
        envelope = reader()
        for _ in range(50):
            got = envelope.decode(data, key=hostile.KEY).value
            if got != value:
                wrong.append(got)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_nested_copies_are_capped() -> None:
    big = b"\xc6" + (3 << 20).to_bytes(4, "big") + bytes(3 << 20)
    two = hostile.bomb(hostile.nested([("tuple", 2)], big), "zstd")
    deep = hostile.bomb(hostile.nested([("tuple", 64)], big), "zstd")
    assert decode(two, 8 << 20) == {"ok"}
    assert decode(deep, 8 << 20) == {"too_large"}
    assert decode(deep) == {"too_large"}  # 2 x 3 MiB a level from the third


# -- depth, in a child process ----------------------------------------------------


class DecodeChild:
    """``tests.support.decode_child``, restarted after it dies."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> subprocess.Popen[str]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.decode_child", str(CHILD_STACK)],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        return self.proc

    def decode(self, layers: list[tuple[str, int]], max_bytes: int) -> dict[str, Any]:
        proc = self.start()
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(json.dumps({"layers": layers, "max_bytes": max_bytes}) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            code = proc.wait(timeout=10)
            raise AssertionError(f"the decoder died (exit code {code}) on {layers}")
        found: dict[str, Any] = json.loads(line)
        return found

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def child() -> Iterator[DecodeChild]:
    found = DecodeChild()
    yield found
    found.close()


def check_in_child(
    child: DecodeChild, layers: list[tuple[str, int]], max_bytes: int
) -> str:
    report = child.decode(layers, max_bytes)
    assert report["escaped"] is None, report
    expected = hostile.outcome(layers, max_bytes)
    if report["ok"]:
        assert expected == {"ok"}, f"decoded beyond the caps: {layers}"
        assert report["matches"]
    else:
        assert report["reason"] in expected, (layers, report)
    return str(report["reason"] or "ok")


@pytest.mark.parametrize("depth", [200, 1000, 100_000])
@pytest.mark.parametrize("kind", EXT)
def test_deep_extensions_in_a_child(child: DecodeChild, kind: str, depth: int) -> None:
    check_in_child(child, [(kind, depth)], DEFAULT_CAP)
    check_in_child(child, [("list", 3), (kind, depth), ("map", 2)], DEFAULT_CAP)


deep_ext_run = st.tuples(
    st.sampled_from(EXT), st.integers(1, 100_000) | st.integers(100, 300)
)
deep_layers = st.lists(
    plain_run | shallow_ext_run | deep_ext_run, min_size=1, max_size=6
).filter(
    lambda layers: (
        hostile.depths(layers)[0] > 120 and sum(count for _, count in layers) <= 150_000
    )
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(layers=deep_layers, max_bytes=st.sampled_from([64 * 1024, DEFAULT_CAP]))
def test_deep_nesting_in_a_child(
    child: DecodeChild, layers: list[tuple[str, int]], max_bytes: int
) -> None:
    event(f"decoded: {check_in_child(child, layers, max_bytes)}")


# -- compression bombs ---------------------------------------------------------------

#: name -> (bytes of one element, units one element costs besides its slot)
ELEMENTS = {
    "nil": (hostile.NIL, 0),
    "empty map": (b"\x80", 8),
    "empty list": (b"\x90", 8),
    "empty tuple": (b"\xd4\x01\x90", 8),
    "two-char str": (b"\xa2ab", 0),
}
HOWS = ["zstd", "zstd-nosize", "zlib"] + (
    ["lz4", "lz4-nosize"] if hostile.lz4_frame is not None else []
)


def bomb_payload(shape: str, count: int) -> tuple[bytes, int]:
    """(msgpack, the units it costs) for ``count`` elements of ``shape``."""
    if shape == "small arrays":
        return hostile.small_arrays(count), 8 + count * (1 + 15 + 8)
    element, extra = ELEMENTS[shape]
    return hostile.flat_elements(count, element), 8 + count * (1 + extra)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    shape=st.sampled_from([*ELEMENTS, "small arrays"]),
    # Every magnitude, up to 2**26 elements (64 MiB of nils).
    count=st.sampled_from(range(26)).flatmap(lambda e: st.integers(2**e, 2 ** (e + 1))),
    how=st.sampled_from(HOWS),
    max_bytes=st.sampled_from([64 * 1024, 1 << 20, DEFAULT_CAP]),
)
@example(shape="nil", count=2**25, how="zstd", max_bytes=DEFAULT_CAP)  # the report
@example(shape="nil", count=(4 << 20) - 8, how="zstd", max_bytes=DEFAULT_CAP)
@example(shape="nil", count=(4 << 20) - 7, how="zstd", max_bytes=DEFAULT_CAP)
@example(shape="empty map", count=(4 << 20) // 9 - 1, how="zlib", max_bytes=DEFAULT_CAP)
@example(shape="small arrays", count=1 << 20, how="zstd", max_bytes=DEFAULT_CAP)
def test_compression_bombs(shape: str, count: int, how: str, max_bytes: int) -> None:
    payload, units = bomb_payload(shape, count)
    if len(payload) > 40 << 20:
        count = count * (40 << 20) // len(payload)
        payload, units = bomb_payload(shape, count)
    found = decode(hostile.bomb(payload, how), max_bytes)
    event(f"decoded: {found}")
    if len(payload) > max_bytes:
        assert found == {"too_large"}
    elif units > max_bytes // unpacking.ELEMENT_BYTES:
        assert found == {"too_large"}, (len(payload), units)
    else:
        assert found == {"ok"}
    # Whatever the bomb did, the thread's decompressors still work.
    assert decode(hostile.bomb(hostile.flat_elements(100), how)) == {"ok"}


def test_the_reported_bomb_is_refused_at_once() -> None:
    data = hostile.issue_bomb()
    assert len(data) == 1059 + hostile.MAC_LEN  # the report's, and a MAC
    started = time.perf_counter()
    assert decode(data) == {"too_large"}
    assert time.perf_counter() - started < 0.1


def test_a_value_the_encoder_writes_at_the_budget_reads_back() -> None:
    envelope = reader(1 << 20)
    key = hostile.KEY

    def roundtrip(value: Any) -> Any:
        data = envelope.encode(value, key=key)
        assert isinstance(data, bytes)
        return envelope.decode(data, key=key).value

    budget = (1 << 20) // unpacking.ELEMENT_BYTES
    fits = [None] * (budget - unpacking.CONTAINER_UNITS)
    assert roundtrip(fits) == fits
    with pytest.raises(DecodeError) as info:
        roundtrip([*fits, None])
    assert info.value.reason == "too_large"
    rows = [[i, i] for i in range((budget - 8) // 11)]  # 2 items + 8, + a slot
    assert roundtrip(rows) == rows
    with pytest.raises(DecodeError):
        roundtrip([*rows, [0, 0]])


@pytest.mark.skipif(hostile.lz4_frame is None, reason="lz4 is not installed")
def test_an_lz4_frame_over_the_cap_does_not_break_the_next() -> None:
    small = hostile.bomb(hostile.flat_elements(100), "lz4")
    over = hostile.bomb(hostile.flat_elements(200_000), "lz4")
    for bad in (over, over[:-5], over[:20] + bytes(40)):
        assert decode(bad, 64 * 1024) != {"ok"}
        # reset() left the thread's decompressor broken: frameSize_wrong.
        assert decode(small, 64 * 1024) == {"ok"}
