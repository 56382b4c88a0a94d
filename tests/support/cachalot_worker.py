"""Child-process entry point for the cachalot test (tests/redis/test_cachalot.py).

``python -m tests.support.cachalot_worker <setup>`` configures Django from
``tests.settings`` plus django-cachalot on an ``ApeeCache`` alias set up as
``<setup>`` says, runs the scenario below on the ``auth_group`` table and
prints one JSON line. A process of its own: cachalot patches the ORM for
good when its app is ready, and registers its checks for every later test.

Setups (the guide's two options, its no-timeout case, and the setup it
warns against):

* ``herd-off``: an alias of its own with ``HERD: False``;
* ``exclude``: the guide's prefixed table keys, listed in ``HERD_EXCLUDE``;
* ``no-timeout``: herd mode on, cachalot's default ``CACHALOT_TIMEOUT``
  (None), its own table keys;
* ``unprotected``: herd mode on, a timeout, cachalot's own table keys.

Timeline (the alias's soft timeout is 2 s of the 40 s timeout): a row is
written (cachalot stamps the table key), two queries are cached a second
later, and read again once the table key is past its soft timeout while
both cached results are not. Herd mode may give the reader of a stale table
key a miss; cachalot then stamps the table anew, and both cached queries
run again. Then a second row is written, and must be read back.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

#: ``CACHALOT_TIMEOUT`` for the setups that have one, and the soft timeout
#: it gets (``SOFT_TIMEOUT_RATIO`` 0.05).
TIMEOUT_S = 40
SOFT_S = 2.0


def configure(setup: str) -> None:
    from django.conf import settings

    from tests import settings as base

    options: dict[str, Any] = {"SOFT_TIMEOUT_RATIO": 0.05}
    extra: dict[str, Any] = {"CACHALOT_TIMEOUT": TIMEOUT_S}
    if setup == "herd-off":
        options["HERD"] = False
    elif setup == "exclude":
        options["HERD_EXCLUDE"] = ["cachalot-table:"]
        extra["CACHALOT_TABLE_KEYGEN"] = "tests.support.cachalot_keys.table_key"
    elif setup == "no-timeout":
        extra["CACHALOT_TIMEOUT"] = None
    else:
        assert setup == "unprotected", setup
    inherited = {name: getattr(base, name) for name in dir(base) if name.isupper()}
    inherited["INSTALLED_APPS"] = [*base.INSTALLED_APPS, "cachalot"]
    inherited["CACHES"] = {
        **base.CACHES,
        "cachalot": {
            "BACKEND": "django_apee.cache.ApeeCache",
            "LOCATION": base.REDIS_URL,
            "KEY_PREFIX": f"cachalot-{setup}",
            "OPTIONS": options,
        },
    }
    settings.configure(**inherited, CACHALOT_CACHE="cachalot", **extra)


def run(setup: str) -> dict[str, Any]:
    from django.contrib.auth.models import Group
    from django.core import checks
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def queries(read: Any) -> tuple[Any, int]:
        """What ``read`` returned, and how many SQL queries it ran."""
        with CaptureQueriesContext(connection) as captured:
            value = read()
        return value, len(captured)

    def names() -> list[str]:
        rows = Group.objects.filter(name__startswith=setup)
        return sorted(rows.values_list("name", flat=True))

    def count() -> int:
        return Group.objects.filter(name__startswith=setup).count()

    report: dict[str, Any] = {
        "checks": sorted(
            m.id for m in checks.run_checks() if str(m.id).startswith("cachalot.")
        )
    }
    started = time.monotonic()
    Group.objects.create(name=f"{setup}-1")  # stamps the table key
    time.sleep(SOFT_S / 2)
    report["first"] = [queries(names), queries(count)]  # cached now
    report["cached"] = [queries(names), queries(count)]  # from the cache
    time.sleep(max(0.0, started + SOFT_S + 0.6 - time.monotonic()))
    # The table key is past its soft timeout, both results are not.
    report["table_stale"] = [queries(names), queries(count)]
    Group.objects.create(name=f"{setup}-2")  # stamps the table key again
    report["after_write"] = queries(names)
    return report


def main() -> None:
    setup = sys.argv[1]
    os.environ.pop("DJANGO_SETTINGS_MODULE", None)
    configure(setup)
    import django

    django.setup()
    print(json.dumps(run(setup)), flush=True)


if __name__ == "__main__":
    main()
