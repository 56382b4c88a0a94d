"""The documentation covers what the code defines (docs/reference/).

Every OPTION conf.py accepts has a row or a mention in the options page,
every system check id the package can emit is in the checks page, and every
metric family and fallback reason is in the metrics page, so none can ship
undocumented. Files are read as text: no Django settings needed.
"""

from __future__ import annotations

import re
from pathlib import Path

from django_apee.conf import APEE_OPTIONS, DJANGO_REDIS_OPTIONS
from django_apee.core import decisions

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


def test_every_metric_and_fallback_reason_is_documented():
    source = (ROOT / "django_apee" / "observe" / "metrics.py").read_text()
    families = set(re.findall(r'"(apee_cache_[a-z_]+)"', source))
    assert len(families) >= 15  # the scan found the families
    reasons = re.search(r"FALLBACK_REASONS = \(([^)]*)\)", source)
    assert reasons is not None
    page = (REFERENCE / "metrics.rst").read_text()
    assert sorted(f for f in families if f"``{f}" not in page) == []
    assert (
        sorted(
            r
            for r in re.findall(r'"(\w+)"', reasons.group(1))
            if f"``{r}``" not in page
        )
        == []
    )


def test_every_herd_decision_the_toolbar_shows_is_documented():
    """The panel's page explains each decision a herd row can show."""
    page = (ROOT / "docs" / "howto" / "debug-toolbar.rst").read_text()
    assert len(decisions.HERD) == 11
    assert [d for d in decisions.HERD if f"``{d}``" not in page] == []
