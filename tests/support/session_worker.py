"""Child-process entry point for the session tests.

``python -m tests.support.session_worker '<json spec>'`` sets Django up with
``tests.settings`` (the session's redis-server and SQLite file come in
through the inherited ``APEE_TEST_REDIS_URL`` and ``APEE_TEST_DB``), uses the
session engine named in ``APEE_TEST_SESSION_ENGINE``, does what the spec says
and prints one JSON line.

Spec keys: ``session_key`` and ``action``:

* ``"write"``: load the session, report its user id, store ``value`` under
  ``"from_child"`` and save.
* ``"load"``: load the session ``loads`` times in each of ``threads``
  threads, released together; report every load's data (``None`` when the
  store came back without a session key, i.e. empty).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from importlib import import_module
from typing import Any


def session_store(engine: str) -> Any:
    return import_module(engine).SessionStore


def write(store_class: Any, spec: dict[str, Any]) -> dict[str, Any]:
    store = store_class(session_key=spec["session_key"])
    user_id = store.get("_auth_user_id")
    store["from_child"] = spec["value"]
    store.save()
    return {"user_id": user_id, "session_key": store.session_key}


def load_many(store_class: Any, spec: dict[str, Any]) -> dict[str, Any]:
    threads = int(spec["threads"])
    barrier = threading.Barrier(threads, timeout=10)
    loads: list[Any] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        for _ in range(int(spec["loads"])):
            store = store_class(session_key=spec["session_key"])
            data = store.load()
            found = dict(data) if store.session_key is not None else None
            with lock:
                loads.append(found)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    return {"loads": loads, "hung": sum(worker.is_alive() for worker in workers)}


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from django.test.utils import override_settings

    engine = os.environ["APEE_TEST_SESSION_ENGINE"]
    override_settings(SESSION_ENGINE=engine).enable()
    store_class = session_store(engine)
    action = {"write": write, "load": load_many}[spec["action"]]
    print(json.dumps(action(store_class, spec)), flush=True)


if __name__ == "__main__":
    main()
