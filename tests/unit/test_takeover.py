"""The pure parts of taking over from a dead holder: tokens and check timing."""

from __future__ import annotations

import math

import pytest

from django_apee.core import keys, policy, takeover


def test_a_token_names_its_holder_and_still_parses():
    token = keys.lease_token(4711)
    assert keys.lease_holder_id(token) == 4711
    assert keys.lease_holder_id(token.encode()) == 4711
    assert keys.parse_lease_token(token) is not None
    assert keys.lease_holder_id(keys.lease_token()) is None  # names nobody


@pytest.mark.parametrize(
    "token", [None, "", "@", "abc@", "@12", "x@12a", "x@-1", "x@" + "9" * 21]
)
def test_tokens_that_name_nobody(token):
    assert keys.lease_holder_id(token) is None


def test_the_first_look_after_one_interval_then_every_interval():
    assert takeover.next_check(10.0, None, 0.1) == pytest.approx(10.1)
    assert takeover.next_check(10.0, 10.3, 0.1) == pytest.approx(10.4)
    assert takeover.next_check(10.0, None, 0) == math.inf  # disabled
    assert takeover.next_check(10.0, None, math.nan) == math.inf


def test_look_only_when_due_named_and_worth_it():
    assert takeover.should_check(10.2, 10.1, 7, 900, 0.1)
    assert not takeover.should_check(10.0, 10.1, 7, 900, 0.1)  # not yet due
    assert not takeover.should_check(10.2, 10.1, None, 900, 0.1)  # names nobody
    assert not takeover.should_check(10.2, 10.1, 7, 80, 0.1)  # ends sooner anyway
    assert takeover.should_check(10.2, 10.1, 7, -1, 0.1)  # no expiry: only a look


def test_the_pause_ends_at_the_next_look_or_the_lease_end():
    assert takeover.pause_s(10.0, 10.1, 0.9) == pytest.approx(0.1)
    assert takeover.pause_s(10.0, 10.5, 0.2) == pytest.approx(0.2)
    assert takeover.pause_s(10.0, 9.0, 0.2) == 0.0
    assert takeover.pause_s(10.0, math.inf, 0.2) == pytest.approx(0.2)


def test_renewed_leases_start_short():
    rules = policy.Policy()
    assert takeover.renewed_lease_ms(None, rules) == 1000
    assert takeover.renewed_lease_ms(100, rules) == policy.lease_ms(100, rules)
    short = policy.Policy(default_lease_ms=600, min_lease_ms=100)
    assert takeover.renewed_lease_ms(None, short) == 600  # LEASE_TIMEOUT if shorter
    floor = policy.Policy(min_lease_ms=2000, default_lease_ms=5000)
    assert takeover.renewed_lease_ms(None, floor) == 2000  # never below LEASE_MIN
