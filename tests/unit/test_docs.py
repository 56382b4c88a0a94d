"""The documentation covers what the code defines (docs/reference/).

Every OPTION conf.py accepts has a row or a mention in the options page, and
every system check id the package can emit is in the checks page, so a new
option or check cannot ship undocumented.
"""

from __future__ import annotations

import re
from pathlib import Path

from django_apee.conf import APEE_OPTIONS, DJANGO_REDIS_OPTIONS

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference"


def test_every_option_is_documented():
    page = (REFERENCE / "options.rst").read_text()
    missing = sorted(
        name
        for name in APEE_OPTIONS | DJANGO_REDIS_OPTIONS
        if f"``{name}``" not in page
    )
    assert missing == []


def test_every_check_id_is_documented():
    emitted = set()
    for path in (ROOT / "django_apee").rglob("*.py"):
        emitted |= set(re.findall(r"apee\.[EW]\d{3}", path.read_text()))
    assert len(emitted) >= 10  # the scan found the checks
    page = (REFERENCE / "checks.rst").read_text()
    assert sorted(i for i in emitted if f"``{i}``" not in page) == []
