"""redis-py's retry policy as ApeeCache sets it, and the wait it bounds.

redis-py re-sends a command that failed with a connection error or a timeout
as often as its ``Retry`` object says, sleeping its backoff in between. Its
defaults differ by how a client is built: ``redis.Redis(host=...)`` retries
10 times with an exponential, jittered backoff (capped at 1 s); a connection
from a pool built from a URL, as django-redis builds them, does not retry at
all; redis-py has changed these between releases. A bound on how long a
request can wait for a frozen Redis, stated in the socket timeouts, holds
only if the retry policy is known, so ApeeCache sets it (OPTION
``REDIS_RETRIES``, see ``conf.py``) on every connection it makes: its pools',
and under Sentinel its connections to the sentinels too.

The bound, for one Redis command (``command_bound``)::

    B = (1 + R) * (Tc + Ts) + sum(backoff after failure n, n = 1..R)

``R`` retries, ``Tc`` = SOCKET_CONNECT_TIMEOUT, ``Ts`` = SOCKET_TIMEOUT;
ApeeCache's retries sleep no backoff. Each attempt may need a new connection
(a failed one is dropped), so each may spend ``Tc`` connecting and ``Ts``
waiting for a reply.

That is for a Redis that stops answering (frozen, blackholed, its host
gone): the first reply that does not come ends the attempt. One that answers
slowly, each reply within ``Ts``, times nothing out; a command then costs its
round trips, and on a new connection redis-py's handshake first (HELLO or
AUTH, CLIENT SETNAME, two CLIENT SETINFO, SELECT: up to 5 more).

Under Sentinel with ``FAILOVER_WAIT`` set, a command waits for a new primary
on purpose: ``B = FAILOVER_WAIT + 2 * (Tc + Ts)`` (the first attempt, the
window after it, the last attempt started in it).

A ``get_or_set_stampede_safe`` caller whose Redis stops answering waits at
most ``B + C`` (``caller_bound``), ``C`` being the compute: its first Redis
command that fails sends it to compute locally (and after
BREAKER_THRESHOLD failures the breaker spares the next callers even that),
and a caller that joins its process's compute of the same key joins one
that began before its own failed command did. A caller already waiting for
*another process's* compute waits for that compute, bounded by its lease,
not by the socket timeouts.
"""

from __future__ import annotations

from typing import Any

from redis.backoff import NoBackoff
from redis.retry import Retry

#: How many times ApeeCache lets redis-py re-send a failed command: none.
#: A timeout is what a frozen Redis looks like, and sending the command
#: again only multiplies the wait; ``get_or_set_stampede_safe`` computes
#: locally instead, and a connection the server closed (CLIENT KILL, a
#: restart) is replaced when the pool hands it out, without a retry.
DEFAULT_REDIS_RETRIES = 0


def retry_policy(retries: int) -> Retry:
    """The ``Retry`` ApeeCache gives redis-py: ``retries`` re-sends, no backoff."""
    return Retry(NoBackoff(), retries)


def backoff_bound(backoff: Any, failures: int) -> float:
    """The longest sleep ``backoff`` may draw after failure number ``failures``.

    redis-py's backoffs are a constant (``_backoff``) or grow to a cap
    (``_cap``, the exponential and jittered ones); any other is charged the
    one sleep it draws now.
    """
    if hasattr(backoff, "_cap"):
        return float(backoff._cap)
    if hasattr(backoff, "_backoff"):
        return float(backoff._backoff)
    return float(backoff.compute(failures))


def command_bound(
    retries: int,
    connect_timeout: float,
    socket_timeout: float,
    backoffs: tuple[float, ...] = (),
) -> float:
    """B: the longest one Redis command may take, in seconds."""
    return (1 + retries) * (connect_timeout + socket_timeout) + sum(backoffs)


def connection_bound(connection: Any) -> float:
    """B for a live redis-py ``Connection``, from the policy it really has.

    Read from the connection, not from OPTIONS, so a test can check the
    bound against what the installed redis-py does.
    """
    retry = connection.retry
    retries = max(0, retry.get_retries())
    socket_timeout = connection.socket_timeout
    connect_timeout = connection.socket_connect_timeout
    if socket_timeout is None or connect_timeout is None:
        return float("inf")
    window = getattr(retry, "window_s", None)
    if window is not None:
        # FAILOVER_WAIT under Sentinel (store/failover.py): attempts go on
        # until ``window`` after the first failure, and the last one started
        # then may take a whole attempt.
        return 2 * (float(connect_timeout) + float(socket_timeout)) + float(window)
    backoffs = tuple(backoff_bound(retry._backoff, n) for n in range(1, retries + 1))
    return command_bound(retries, connect_timeout, socket_timeout, backoffs)


def caller_bound(command_s: float, compute_s: float) -> float:
    """The longest a ``get_or_set_stampede_safe`` caller waits when Redis
    stops answering: one command's bound and the compute (see the module)."""
    return command_s + compute_s
