"""CircuitBreaker, pure: every transition driven by an injected fake clock.

closed --threshold failures--> open --cooldown--> half-open (one probe)
half-open --success--> closed (cooldown back to the base)
half-open --failure--> open for twice as long, capped at max_cooldown
"""

from __future__ import annotations

import threading

import pytest

from django_apee.core.breaker import CircuitBreaker


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, **kwargs: float) -> CircuitBreaker:
    options = {"threshold": 3, "cooldown": 1.0, "max_cooldown": 5.0, **kwargs}
    return CircuitBreaker(clock=clock, **options)  # type: ignore[arg-type]


def open_it(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.threshold):
        assert breaker.allow() is True
        breaker.failure()
    assert breaker.is_open


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0},
        {"cooldown": 0},
        {"cooldown": -1.0},
        {"cooldown": 2.0, "max_cooldown": 1.0},
    ],
)
def test_rejects_bad_configuration(clock, kwargs):
    with pytest.raises(ValueError, match="threshold"):
        make(clock, **kwargs)


def test_closed_lets_everyone_through(clock):
    breaker = make(clock)
    assert not breaker.is_open
    assert all(breaker.allow() for _ in range(100))


def test_opens_only_after_threshold_consecutive_failures(clock):
    breaker = make(clock, threshold=3)
    breaker.failure()
    breaker.failure()
    assert not breaker.is_open
    assert breaker.allow() is True
    breaker.failure()
    assert breaker.is_open
    assert breaker.allow() is False


def test_a_success_resets_the_failure_count(clock):
    breaker = make(clock, threshold=3)
    breaker.failure()
    breaker.failure()
    breaker.success()
    breaker.failure()
    breaker.failure()
    assert not breaker.is_open  # 2 + 2 failures, never 3 in a row
    assert breaker.allow() is True


def test_open_refuses_until_the_cooldown_has_passed(clock):
    breaker = make(clock, cooldown=1.0)
    open_it(breaker)
    assert breaker.allow() is False
    clock.advance(0.5)
    assert breaker.allow() is False
    clock.advance(0.499)
    assert breaker.allow() is False
    clock.advance(0.001)  # exactly the cooldown: half-open
    assert breaker.allow() is True


def test_half_open_lets_exactly_one_probe_through(clock):
    breaker = make(clock)
    open_it(breaker)
    clock.advance(1.0)
    assert breaker.allow() is True  # the probe
    assert [breaker.allow() for _ in range(10)] == [False] * 10
    clock.advance(100.0)  # however long the probe takes, still one at a time
    assert breaker.allow() is False


def test_half_open_probe_is_single_under_threads(clock):
    breaker = make(clock)
    open_it(breaker)
    clock.advance(1.0)
    barrier = threading.Barrier(32, timeout=5)
    allowed: list[bool] = []
    lock = threading.Lock()

    def probe() -> None:
        barrier.wait()
        answer = breaker.allow()
        with lock:
            allowed.append(answer)

    threads = [threading.Thread(target=probe) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(allowed) == 32
    assert allowed.count(True) == 1


def test_probe_success_closes(clock):
    breaker = make(clock)
    open_it(breaker)
    clock.advance(1.0)
    assert breaker.allow() is True
    breaker.success()
    assert not breaker.is_open
    assert all(breaker.allow() for _ in range(10))


def test_failed_probes_double_the_cooldown_up_to_max_success_resets(clock):
    breaker = make(clock, cooldown=1.0, max_cooldown=5.0)
    open_it(breaker)
    waits = []
    for _ in range(5):
        # Find how long the breaker stays shut, to the millisecond.
        start, shut_ms = clock.now, 0
        while not breaker.allow():
            shut_ms += 1
            clock.now = start + shut_ms / 1000
            assert shut_ms < 60_000
        waits.append(shut_ms / 1000)
        breaker.failure()  # the probe fails
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]

    clock.advance(5.0)
    assert breaker.allow() is True
    breaker.success()
    assert not breaker.is_open
    open_it(breaker)  # a new outage starts from the base cooldown again
    clock.advance(0.999)
    assert breaker.allow() is False
    clock.advance(0.001)
    assert breaker.allow() is True


def test_late_failures_while_open_keep_it_shut(clock):
    # Callers that entered before the breaker opened report failures later:
    # they must not make it half-open early.
    breaker = make(clock, cooldown=1.0)
    open_it(breaker)
    clock.advance(0.8)
    breaker.failure()
    clock.advance(0.5)  # 1.3 s after opening, 0.5 s after the late failure
    assert breaker.allow() is False
    clock.advance(0.5)
    assert breaker.allow() is True
