"""Issue 13, item 25: the shipped alert rules cover what operators of a start/status service ask
for (no live worker, failure rate, queue depth, average duration), and name only real metrics."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import yaml
from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.django_db(transaction=True)

RULES = Path(settings.BASE_DIR) / "docs" / "prometheus-alerts.yml"
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created")


def alert_rules() -> dict[str, dict[str, object]]:
    document = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule for group in document["groups"] for rule in group["rules"]}


def test_the_rules_cover_the_four_alerts_operators_ask_for() -> None:
    rules = alert_rules()
    assert {"SkiplockNoLiveWorker", "SkiplockHighFailureRate", "SkiplockQueueDepthHigh",
            "SkiplockJobDurationHigh"} <= set(rules)
    duration = str(rules["SkiplockJobDurationHigh"]["expr"])
    assert "by (task)" in duration  # one alert per task, not one for the whole service
    assert re.search(r"skiplock_job_duration_seconds_sum.*/.*skiplock_job_duration_seconds_count", duration, re.S)
    assert re.search(r">\s*\d+", duration)  # a threshold, in seconds


def test_every_metric_a_rule_names_is_served_by_metrics(asgi_server: str) -> None:
    text = httpx.get(f"{asgi_server}/metrics", timeout=30).text
    families = {family.name for family in text_string_to_metric_families(text)}
    exposed = {name + suffix for name in families for suffix in SUFFIXES}
    for name, rule in alert_rules().items():
        assert rule["annotations"]["summary"], name  # type: ignore[index]
        expression = str(rule["expr"]) + str(rule["annotations"])
        for metric in re.findall(r"\bskiplock_[a-z_]+", expression):
            assert metric in exposed, (name, metric)
