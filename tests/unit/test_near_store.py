"""core/near.py: the near cache's LRU, its bounds and its tickets."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from django_apee.core.near import PLACEHOLDER_BYTES, Limits, NearStore
from django_apee.core.tally import Tally


def filled(store: NearStore, key: str, entry: object, size: int) -> bool:
    return store.fill(store.reserve(key), entry, size)


def test_fill_then_get() -> None:
    store = NearStore(Limits(10, 10_000))
    assert store.get("k") is None
    assert filled(store, "k", "v", 100)
    assert store.get("k") == "v"
    assert store.bytes == 100
    assert len(store) == 1


def test_placeholder_is_not_a_hit() -> None:
    store = NearStore(Limits(10, 10_000))
    store.reserve("k")
    assert store.get("k") is None
    assert store.bytes == PLACEHOLDER_BYTES


def test_invalidation_between_reserve_and_fill_refuses_the_fill() -> None:
    store = NearStore(Limits(10, 10_000))
    ticket = store.reserve("k")
    assert store.invalidate(["k"]) == 1
    assert not store.fill(ticket, "old", 10)
    assert store.get("k") is None


def test_flush_refuses_older_tickets_even_if_reserved_again() -> None:
    store = NearStore(Limits(10, 10_000))
    old = store.reserve("k")
    store.flush()
    store.reserve("k")  # another reader, after the flush
    assert not store.fill(old, "old", 10)


def test_a_newer_reservation_wins_over_an_older_one() -> None:
    store = NearStore(Limits(10, 10_000))
    first = store.reserve("k")
    second = store.reserve("k")
    assert not store.fill(first, "first", 10)
    assert store.fill(second, "second", 10)
    assert store.get("k") == "second"


def test_release_drops_only_its_own_placeholder() -> None:
    store = NearStore(Limits(10, 10_000))
    first = store.reserve("k")
    second = store.reserve("k")
    store.release(first)
    assert len(store) == 1
    store.release(second)
    assert len(store) == 0
    assert store.bytes == 0


def test_least_recently_used_goes_first() -> None:
    store = NearStore(Limits(2, 10_000))
    filled(store, "a", 1, 10)
    filled(store, "b", 2, 10)
    assert store.get("a") == 1  # a is now the most recent
    filled(store, "c", 3, 10)
    assert store.get("b") is None
    assert store.get("a") == 1
    assert store.get("c") == 3
    assert store.take_evictions() == 1
    assert store.take_evictions() == 0


def test_bytes_bound_evicts_until_it_fits() -> None:
    store = NearStore(Limits(100, 1000))
    for key in "abcd":
        filled(store, key, key, 300)
    assert store.bytes <= 1000
    assert [store.get(k) for k in "abcd"] == [None, "b", "c", "d"]


def test_an_entry_bigger_than_the_budget_is_not_kept() -> None:
    store = NearStore(Limits(100, 1000))
    filled(store, "small", 1, 10)
    assert not filled(store, "huge", 2, 1001)
    assert store.get("small") == 1
    assert store.get("huge") is None


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Limits(0, 10)


operations = st.lists(
    st.tuples(
        st.sampled_from(["fill", "get", "invalidate", "flush", "reserve"]),
        st.integers(0, 30),
        st.integers(1, 500),
    ),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(
    operations,
    st.integers(1, 12),
    st.integers(PLACEHOLDER_BYTES, 2000),
)
def test_bounds_hold_and_bytes_add_up(
    ops: list[tuple[str, int, int]], max_entries: int, max_bytes: int
) -> None:
    """Whatever happens, the bounds hold, the byte count is the sum of what
    is held, and a get only answers what the last successful fill put."""
    store = NearStore(Limits(max_entries, max_bytes))
    model: dict[str, int] = {}  # what a get may answer
    for op, number, size in ops:
        key = f"k{number}"
        if op == "fill":
            entry = number * 1000 + size
            if filled(store, key, entry, size):
                model[key] = entry
            else:
                model.pop(key, None)
        elif op == "reserve":
            store.reserve(key)
            model.pop(key, None)
        elif op == "get":
            found = store.get(key)
            assert found is None or found == model.get(key)
        elif op == "invalidate":
            store.invalidate([key])
            model.pop(key, None)
        else:
            store.flush()
            model.clear()
        assert len(store) <= max_entries
        assert store.bytes <= max_bytes
        assert store.bytes == sum(size for _, size in store._items.values())


def test_threads_keep_the_bounds() -> None:
    store = NearStore(Limits(50, 5000))

    def work(offset: int) -> None:
        for i in range(2000):
            key = f"k{(i * 7 + offset) % 200}"
            if i % 5 == 0:
                store.invalidate([key])
            elif store.get(key) is None:
                filled(store, key, i, 1 + i % 300)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store) <= 50
    assert store.bytes <= 5000
    assert store.bytes == sum(size for _, size in store._items.values())


def test_tally_hands_out_every_count_once_across_threads() -> None:
    tally = Tally()
    taken: list[int] = []

    def add() -> None:
        for _ in range(5000):
            tally.add()

    def take() -> None:
        for _ in range(200):
            taken.append(tally.take())

    threads = [threading.Thread(target=add) for _ in range(3)]
    threads.append(threading.Thread(target=take))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(taken) + tally.take() == 15_000
    assert tally.take() == 0
