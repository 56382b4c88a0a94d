"""contrib/: the Grafana dashboard and the alert rules use metrics that exist.

Every ``apee_cache_*`` name in them must be a sample our default registry
exports (``_total`` for counters; ``_bucket``, ``_sum``, ``_count`` for
histograms), so a renamed metric breaks this test, not a dashboard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
NAME = re.compile(r"\bapee_cache_[a-z_]+\b")


def exported() -> set[str]:
    """Sample names of our families (the "default" alias is set up at start-up)."""
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("apee_cache_"):
            names.update(s.name for s in family.samples if s.labels.get("cache"))
    return names


def dashboard_exprs() -> list[str]:
    board = json.loads((CONTRIB / "grafana" / "django-apee.json").read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    exprs += [
        var["query"]["query"]
        for var in board["templating"]["list"]
        if isinstance(var.get("query"), dict)
    ]
    return exprs


def alert_rules() -> dict[str, str]:
    rules = yaml.safe_load((CONTRIB / "prometheus" / "alerts.yml").read_text())
    return {
        rule["alert"]: rule["expr"]
        for group in rules["groups"]
        for rule in group["rules"]
    }


def test_every_referenced_apee_metric_is_exported():
    names = exported()
    assert "apee_cache_hits_total" in names
    assert "apee_cache_lease_wait_seconds_bucket" in names
    exprs = dashboard_exprs() + list(alert_rules().values())
    referenced = {name for expr in exprs for name in NAME.findall(expr)}
    assert len(referenced) >= 12
    assert referenced <= names, referenced - names


def test_the_articles_alerts_are_there():
    rules = alert_rules()
    assert "< 0.8" in rules["ApeeCacheHitRatioLow"]
    p95 = rules["ApeeCacheLeaseWaitP95High"]
    assert "histogram_quantile(0.95" in p95
    assert "apee_cache_lease_wait_seconds_bucket" in p95
    assert p95.strip().endswith("> 0.2")
    assert "> 0.8" in rules["ApeeCacheRedisMemoryHigh"]
    assert (
        "apee_cache_serialization_errors_total" in rules["ApeeCacheSerializationErrors"]
    )


def test_dashboard_panels_have_unique_ids_and_targets():
    board = json.loads((CONTRIB / "grafana" / "django-apee.json").read_text())
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)) == 10
    assert all(panel["targets"] for panel in board["panels"])
