"""The names of what was decided for one key, as a trace shows them.

The engine reports them through ``Events.decided`` (``engine/protocol.py``):
a plain get's herd-mode decision, or a stampede-safe caller's wait for its
own process's computation. The counters count the same events without the
key; a debugging tool (``observe/trace.py``, the django-debug-toolbar panel)
shows them per key. Here, below both, so each name is written once.
"""

from __future__ import annotations

#: Herd mode made this reader miss: it won the lease and writes the next
#: value (counted in ``herd_misses`` too).
HERD_MISS = "herd miss: lease won, this reader writes"
#: Served: another reader (of any process) holds the lease and refreshes it.
SERVED_HELD = "served: refresh claimed by another reader"
#: Served: this process won the lease earlier and its write is due.
SERVED_CLAIMED = "served: refresh claimed by this process"
#: Served: the entry was rewritten between the read and the lease.
SERVED_REWRITTEN = "served: rewritten meanwhile"
#: Served: the key is in ``HERD_EXCLUDE``, never a herd miss.
SERVED_EXCLUDED = "served: HERD_EXCLUDE"
#: Served: ``get_or_set_stampede_safe`` wrote it; its own callers refresh it.
SERVED_STAMPEDE_SAFE = "served: its stampede-safe callers refresh it"
#: An absent (or expired) key being computed: another reader's write landed.
WAIT_LANDED = "waited: another reader's write landed"
#: An absent (or expired) key: its lease was free or ran out; this reader
#: writes (a herd miss).
WAIT_WON = "miss: lease won after waiting, this reader writes"
#: The wait for an absent key ran out (``COLD_MISS_WAIT`` or ``WAIT_TIMEOUT``).
WAIT_TIMED_OUT = "miss: wait timed out"
#: A miss not waited for: ``HERD_EXCLUDE``.
MISS_EXCLUDED = "miss: HERD_EXCLUDE, not waited for"
#: A miss not waited for: a former winner never wrote it (absent by design).
MISS_ABSENT = "miss: absent by design, not waited for"
HERD = (
    HERD_MISS, SERVED_HELD, SERVED_CLAIMED, SERVED_REWRITTEN, SERVED_EXCLUDED,
    SERVED_STAMPEDE_SAFE, WAIT_LANDED, WAIT_WON, WAIT_TIMED_OUT, MISS_EXCLUDED,
    MISS_ABSENT,
)  # fmt: skip
#: ``Events.decided``: a stampede-safe caller waited for its process's own
#: computation of the key (single-flight), not for a Redis lease.
WAITED_IN_PROCESS = "waited in process"
