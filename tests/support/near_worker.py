"""Child-process writer for the near-cache tests.

``python -m tests.support.near_worker`` sets Django up with ``tests.settings``
(the session's redis-server), prints ``READY``, then obeys one command a
line on stdin against ``caches["default"]`` (no near cache: the other
process whose writes the test's near cache must see):

* ``set <key> <int>``: ``cache.set(key, {"n": int}, 600)``, then prints
  ``done`` (a dict: a bare int is stored raw, without the write time a
  near cache needs to keep it);
* ``delete <key>``: ``cache.delete(key)``, then prints ``done``;
* ``quit``: exits.
"""

from __future__ import annotations

import sys


def main() -> None:
    import django

    django.setup()
    from django.core.cache import caches

    cache = caches["default"]
    print("READY", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "set":
            cache.set(words[1], {"n": int(words[2])}, 600)
        elif words[0] == "delete":
            cache.delete(words[1])
        print("done", flush=True)


if __name__ == "__main__":
    main()
