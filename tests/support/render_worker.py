"""Child process of the template-fragment stampede tests.

``python -m tests.support.render_worker`` reads its spec (JSON) from the
``APEE_RENDER_SPEC`` environment variable, sets Django up with
``tests.settings`` (the session's redis-server comes in through the inherited
``APEE_TEST_REDIS_URL``), adds the spec's cache alias, compiles the template
and warms the cache alias up (coordinator, wake-up subscription), prints
``READY`` and waits for one line on stdin. Then its threads render the
template together and the process prints one JSON line: what each render
returned, or the error it raised.

The fragment counts its renders: ``{{ probe }}`` INCRs the raw Redis key
``spec["counter"]`` (so the parent counts across processes), sleeps
``render_s`` (a slow fragment, so the callers really overlap it) and prints
``fresh fragment #N``.

The process then returns normally: the interpreter finishes the background
refreshes already handed to the refresh pool before it exits, so once the
parent has seen it exit, the counter is final.

Spec keys: ``alias``, ``options`` (CACHES OPTIONS), ``template``,
``threads``, ``counter``, ``render_s``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from typing import Any

SPEC_VARIABLE = "APEE_RENDER_SPEC"


def cache_config(options: dict[str, Any]) -> dict[str, Any]:
    from tests.support import target

    return target.cache_config(options)


class Probe:
    """A context value that counts, in Redis, every render that prints it."""

    def __init__(self, raw: Any, counter: str, render_s: float) -> None:
        self.raw = raw
        self.counter = counter
        self.render_s = render_s

    def __str__(self) -> str:
        number = int(self.raw.incr(self.counter))
        time.sleep(self.render_s)  # an expensive fragment
        return f"fresh fragment #{number}"


def warm_up(alias: str) -> None:
    """Build the coordinator and subscribe to wake-ups before the release."""
    from django.core.cache import caches

    cache = caches[alias]
    warm_key = f"warmup:{os.getpid()}"
    cache.get_or_set_stampede_safe(warm_key, "warm", 5)
    cache.delete(warm_key)
    hub = cache.runtime.hub
    hub.done(warm_key, hub.expect(warm_key))  # starts the subscriber if needed
    if not hub.subscribed.wait(10):
        raise RuntimeError("wake-up subscription did not come up")


def render_once(template: Any, context: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"html": template.render(context)}
    except Exception as error:
        return {
            "error": f"{type(error).__name__}: {error}",
            "trace": traceback.format_exc(),
        }


def main() -> None:
    spec = json.loads(os.environ[SPEC_VARIABLE])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.template.loader import get_template
    from django.test.utils import override_settings

    alias = spec["alias"]
    caches_setting = {**settings.CACHES, alias: cache_config(spec["options"])}
    override_settings(CACHES=caches_setting).enable()
    from tests.support import target

    raw = target.raw_client(socket_timeout=10)
    template = get_template(spec["template"])
    context = {
        "alias": alias,
        "probe": Probe(raw, spec["counter"], float(spec["render_s"])),
    }
    warm_up(alias)

    go = threading.Event()
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def run() -> None:
        go.wait(120)
        result = render_once(template, context)
        with lock:
            results.append(result)

    threads = [
        threading.Thread(target=run, daemon=True) for _ in range(int(spec["threads"]))
    ]
    for thread in threads:
        thread.start()
    print("READY", flush=True)
    sys.stdin.readline()
    go.set()
    deadline = time.monotonic() + 60
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = sum(thread.is_alive() for thread in threads)
    with lock:
        reported = list(results)
    print(json.dumps({"pid": os.getpid(), "results": reported, "hung": hung}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
