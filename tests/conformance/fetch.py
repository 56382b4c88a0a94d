"""Fetch Django's own cache tests for the installed Django version.

Django's wheels carry no tests, its sdist does: ``tests/cache/`` holds
``BaseCacheTests``, which every built-in backend must pass. This downloads the
sdist of exactly ``django.__version__`` from the package index pip uses, and
unpacks only ``tests/cache`` into ``DEST/django-<version>/``. Prints the
directory to put on ``sys.path`` (it contains the ``cache`` package).

    python -m tests.conformance.fetch .cache/django-tests
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import django


def fetch(dest: Path) -> Path:
    version = django.__version__
    target = dest / f"django-{version}"
    if (target / "cache" / "tests.py").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"django=={version}",
                "--dest",
                tmp,
            ],
            check=True,
        )
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            members = [
                m for m in tar.getmembers() if "/tests/cache/" in m.name and m.isfile()
            ]
            target.mkdir(parents=True, exist_ok=True)
            for member in members:
                relative = member.name.split("/tests/", 1)[1]
                data = tar.extractfile(member)
                assert data is not None
                out = target / relative
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(data.read())
    if not (target / "cache" / "tests.py").exists():
        raise SystemExit(f"no tests/cache/tests.py in the Django {version} sdist")
    return target


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/django-tests")))
