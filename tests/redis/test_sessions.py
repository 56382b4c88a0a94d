"""Django sessions stored in ApeeCache, shared across real processes.

For ``cache`` sessions the cache is the only copy of a session; for
``cached_db`` it is the copy every request reads first. Either way a logged
in user must stay logged in whichever process serves them, and a session
must never be reported missing while it is alive, not even near its
expiry, where herd mode (one early miss for an entry past its soft timeout)
would otherwise hand one reader an empty session.

Child processes run ``tests/support/session_worker.py`` against the same Redis and
the same SQLite file; ``transaction=True`` makes the rows this process
writes visible to them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.core.cache import caches
from django.test import Client, override_settings

ROOT = Path(__file__).resolve().parents[2]
ENGINES = [
    "django.contrib.sessions.backends.cache",
    "django.contrib.sessions.backends.cached_db",
]
AUTH_MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
#: Logging in hashes a password; the default hasher costs a second of CPU.
FAST_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


class Child:
    """One ``tests.support.session_worker`` process using ``engine``."""

    def __init__(self, engine: str, **spec: Any) -> None:
        env = {**os.environ, "APEE_TEST_SESSION_ENGINE": engine}
        env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.session_worker", json.dumps(spec)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise
        finally:
            self.stderr.seek(0)
            errors = self.stderr.read()[-3000:]
            self.stderr.close()
        assert self.proc.returncode == 0, errors
        found: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return found


def store_class(engine: str) -> Any:
    return import_module(engine).SessionStore


def session_cache_key(engine: str, session_key: str) -> str:
    """The Redis key ApeeCache stores ``session_key``'s session under."""
    store = store_class(engine)(session_key=session_key)
    alias = settings.SESSION_CACHE_ALIAS
    return str(caches[alias].client.make_key(store.cache_key))


@pytest.fixture(params=ENGINES, ids=["cache", "cached_db"])
def engine(request: pytest.FixtureRequest) -> Any:
    with override_settings(
        SESSION_ENGINE=request.param,
        MIDDLEWARE=AUTH_MIDDLEWARE,
        PASSWORD_HASHERS=FAST_HASHERS,
    ):
        yield request.param


@pytest.mark.django_db(transaction=True)
def test_a_login_is_shared_with_another_process(engine, raw_redis):
    user = User.objects.create_user("ada", password="analytical")
    client = Client()
    assert client.login(username="ada", password="analytical")
    session_key = client.cookies[settings.SESSION_COOKIE_NAME].value
    assert raw_redis.exists(session_cache_key(engine, session_key))

    child = Child(
        engine, action="write", session_key=session_key, value="written by a child"
    ).result()

    assert child == {"user_id": str(user.pk), "session_key": session_key}
    reread = store_class(engine)(session_key=session_key)
    assert reread["from_child"] == "written by a child"
    assert reread["_auth_user_id"] == str(user.pk)
    response = client.get("/whoami/")
    assert response.status_code == 200
    assert response.json() == {"pk": user.pk, "from_child": "written by a child"}


@pytest.mark.django_db(transaction=True)
def test_a_session_near_its_expiry_still_loads_everywhere(engine, raw_redis):
    """In the last 2 % of its life a session is read by everyone, never missed.

    The session is written with the default age (two weeks); a raw PEXPIRE
    then leaves its key 2 % of that, so it is past any soft timeout but far
    from expiring during the test. For ``cached_db`` the database row is
    deleted, so that only the cache can answer: a miss from the cache shows
    up as an empty session instead of being hidden by the database fallback.
    """
    store = store_class(engine)()
    store["marker"] = "still here"
    store.create()
    session_key = store.session_key
    assert session_key is not None
    if engine.endswith("cached_db"):
        Session.objects.filter(session_key=session_key).delete()
    made = session_cache_key(engine, session_key)
    life_ms = settings.SESSION_COOKIE_AGE * 1000
    assert raw_redis.pttl(made) > 0.9 * life_ms
    assert raw_redis.pexpire(made, life_ms // 50)

    children = [
        Child(engine, action="load", session_key=session_key, threads=4, loads=3)
        for _ in range(3)
    ]
    here = load_in_threads(engine, session_key, threads=8, loads=3)
    outcomes = [child.result() for child in children]

    loads = here + [load for outcome in outcomes for load in outcome["loads"]]
    assert [outcome["hung"] for outcome in outcomes] == [0, 0, 0]
    assert len(loads) == 8 * 3 + 3 * 4 * 3
    empty = [load for load in loads if load is None]
    assert not empty, f"{len(empty)} of {len(loads)} loads found no session"
    assert {load["marker"] for load in loads if load is not None} == {"still here"}
    assert 0 < raw_redis.pttl(made) <= life_ms // 50  # nobody rewrote it


def load_in_threads(
    engine: str, session_key: str, threads: int, loads: int
) -> list[dict[str, Any] | None]:
    """Load the session ``loads`` times in each of ``threads`` threads here."""
    barrier = threading.Barrier(threads, timeout=10)
    found: list[dict[str, Any] | None] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        for _ in range(loads):
            store = store_class(engine)(session_key=session_key)
            data = store.load()
            with lock:
                found.append(dict(data) if store.session_key is not None else None)

    workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert not any(worker.is_alive() for worker in workers), "loads hung"
    return found


@pytest.mark.django_db(transaction=True)
def test_a_session_gone_from_the_cache_loads_as_none(engine, raw_redis):
    """The check above can fail: a session the cache misses loads as None."""
    store = store_class(engine)()
    store["marker"] = "gone soon"
    store.create()
    Session.objects.filter(session_key=store.session_key).delete()
    raw_redis.delete(session_cache_key(engine, store.session_key))

    assert load_in_threads(engine, store.session_key, threads=2, loads=1) == [
        None,
        None,
    ]
