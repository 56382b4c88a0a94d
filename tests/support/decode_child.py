"""A child process that decodes hostile nestings, so a crash fails one test.

``python -m tests.support.decode_child STACK_BYTES`` reads one JSON request
per line on stdin: ``{"layers": [[kind, count], ...], "max_bytes": n}``
(see :func:`tests.support.hostile.nested`). It wraps the nesting in an
envelope, decodes it with ``Envelope.decode`` in a fresh thread whose stack
is ``STACK_BYTES`` (0: the platform's default) and prints one JSON line:
``ok``, the DecodeError ``reason``, anything else that ``escaped``, and
whether the value ``matches`` the layers. A segfault ends the process
instead: the parent sees the exit code and fails the example.

No Django and no Redis: only the core and the byte builders are imported.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

from django_apee.core.envelope import DecodeError, Envelope
from tests.support import hostile


def decode(request: dict[str, Any]) -> dict[str, Any]:
    layers = [(kind, count) for kind, count in request["layers"]]
    envelope = Envelope(
        pickle_fallback=False,
        signing_keys=[hostile.SIGNING_KEY],
        max_decompressed_bytes=request["max_bytes"],
    )
    data = hostile.envelope(hostile.nested(layers))
    report: dict[str, Any] = {"ok": False, "reason": None, "escaped": None}
    try:
        value = envelope.decode(data, key=hostile.KEY).value
    except DecodeError as error:
        report["reason"] = error.reason
        return report
    except BaseException as error:  # what the test is looking for
        report["escaped"] = f"{type(error).__name__}: {error}"
        return report
    report["ok"] = True
    report["matches"] = hostile.matches(value, layers)
    return report


def main() -> None:
    stack = int(sys.argv[1])
    if stack:
        threading.stack_size(stack)
    for line in sys.stdin:
        found: dict[str, Any] = {}
        worker = threading.Thread(target=run, args=(json.loads(line), found))
        worker.start()
        worker.join()
        print(json.dumps(found), flush=True)


def run(request: dict[str, Any], found: dict[str, Any]) -> None:
    found.update(decode(request))


if __name__ == "__main__":
    main()
