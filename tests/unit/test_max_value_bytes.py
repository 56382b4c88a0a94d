"""OPTIONS ``MAX_VALUE_BYTES``: parsed in ``conf``, handed to the envelope."""

from __future__ import annotations

import pytest

from django_apee.cache import ApeeCache
from django_apee.conf import DEFAULT_MAX_VALUE_BYTES, parse
from django_apee.core.envelope import Envelope


def test_the_default_is_32_mib_and_the_envelopes() -> None:
    parsed, problems = parse({})
    assert problems == []
    assert parsed.max_value_bytes == DEFAULT_MAX_VALUE_BYTES == 32 * 1024 * 1024
    envelope = Envelope(pickle_fallback=False, signing_keys=[b"key"])
    assert envelope.max_decompressed_bytes == DEFAULT_MAX_VALUE_BYTES


@pytest.mark.parametrize(
    ("given", "parsed"), [(1024, 1024), (8 << 20, 8 << 20), (1e9, 10**9)]
)
def test_numbers_from_one_kib_up(given: float, parsed: int) -> None:
    options, problems = parse({"MAX_VALUE_BYTES": given})
    assert problems == []
    assert options.max_value_bytes == parsed
    assert type(options.max_value_bytes) is int


@pytest.mark.parametrize("given", [1023, 0, -1, True, "32M", None])
def test_anything_else_is_an_error(given: object) -> None:
    options, problems = parse({"MAX_VALUE_BYTES": given})
    assert [problem.id for problem in problems] == ["apee.E001"]
    assert "'MAX_VALUE_BYTES'" in problems[0].message
    assert options.max_value_bytes == DEFAULT_MAX_VALUE_BYTES


def test_the_backend_hands_it_to_the_envelope() -> None:
    backend = ApeeCache(
        "redis://127.0.0.1:9/0", {"OPTIONS": {"MAX_VALUE_BYTES": 1 << 20}}
    )
    assert backend.envelope.max_decompressed_bytes == 1 << 20
    default = ApeeCache("redis://127.0.0.1:9/0", {})
    assert default.envelope.max_decompressed_bytes == DEFAULT_MAX_VALUE_BYTES
