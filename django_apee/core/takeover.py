"""When a waiter asks whether a lease's holder still exists.

A lease names its holder: the Redis client id of the holder process's
identity connection (``keys.lease_token``). A process that dies (SIGKILL, OOM
killer, a crashed worker) closes its sockets; the kernel tells Redis, and the
client id disappears from ``CLIENT LIST`` at once. A waiter that has waited
``interval`` and finds the id gone takes the lease over at once (a
compare-and-swap on the dead holder's token) instead of sleeping to the
lease's end. A holder that is alive but stuck (SIGSTOP, a long GC pause, a
partitioned host whose socket Redis still keeps) still has a client id: it is
ended by its lease running out, as before.

Why wait ``interval`` before the first look: nearly every lease belongs to a
live holder that finishes soon; asking at once would cost every waiter a
round trip for nothing. One look per ``interval`` then bounds the time from
a holder's death to its takeover by about ``interval`` plus a round trip.

The first lease is short too (``renewed_lease_ms``), so a stuck holder is
not waited for long either. Pure: the clock comes in as an argument.
"""

from __future__ import annotations

import math

from django_apee.core.policy import Policy, lease_ms

#: Default of the ``HOLDER_CHECK`` option: seconds between looks.
DEFAULT_INTERVAL_S = 0.1
#: A renewed lease's length before any compute time is known (1 s): short,
#: because the renewer extends it while its holder lives; a holder stuck
#: alive (SIGSTOP) blocks its key for at most this long.
FIRST_RENEWED_LEASE_MS = 1000


def renewed_lease_ms(delta_ms: int | None, policy: Policy) -> int:
    """``policy.lease_ms`` for a lease the renewer keeps alive: with Δ unknown,
    ``FIRST_RENEWED_LEASE_MS`` (within ``[min_lease_ms, default_lease_ms]``)
    rather than the unrenewed default, which herd mode needs generous."""
    if delta_ms:
        return lease_ms(delta_ms, policy)
    first = max(policy.min_lease_ms, FIRST_RENEWED_LEASE_MS)
    return min(policy.default_lease_ms, first)


def next_check(started: float, last: float | None, interval_s: float) -> float:
    """When (same clock as ``started``) the next look at the holder is due.

    ``started`` is when this waiter began waiting, ``last`` its last look
    (None: none yet). ``interval_s <= 0`` disables looks: never due.
    """
    if not interval_s > 0 or math.isnan(interval_s):
        return math.inf
    return (started if last is None else last) + interval_s


def should_check(
    now: float, due: float, holder_id: int | None, lease_pttl_ms: int, interval_s: float
) -> bool:
    """Look at the holder now? Only with a named holder, once due, and only
    when its lease has more than one ``interval`` left (else its expiry comes
    as soon as the answer would)."""
    if holder_id is None or now < due:
        return False
    return lease_pttl_ms > interval_s * 1000 or lease_pttl_ms == -1


def pause_s(now: float, due: float, lease_wait_s: float) -> float:
    """How long to block before looking again: until the holder's lease ends
    (``lease_wait_s``, from ``policy.wait_ms``) or the next look, whichever
    comes first; never negative."""
    return max(0.0, min(lease_wait_s, due - now))
