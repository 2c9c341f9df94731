"""deploy/prometheus: the configuration and alert rules pass `promtool check` and the rules' unit
tests (`promtool test rules`), and agree with the code: the metrics they name, the Compose
services they scrape, the runbook sections they link. (scripts/container-check runs Prometheus
for real against the lb profile.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from bench.server import ROOT

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
ALERTS = {rule["alert"]: rule for group in RULES["groups"] for rule in group["rules"] if "alert" in rule}
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SUFFIXES = ("_total", "_bucket", "_count", "_sum")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian's `prometheus` package; scripts/test installs it)"
)


def promtool(*args: str) -> str:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@needs_promtool
def test_promtool_accepts_the_configuration_and_the_rules() -> None:
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    assert f"SUCCESS: {len(ALERTS)} rules found" in promtool("check", "rules", "alerts.yml")


@needs_promtool
def test_every_alert_fires_on_its_series_and_stays_silent_on_the_baseline() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_every_alert_is_unit_tested_both_ways() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert fired == set(ALERTS) and silent == set(ALERTS)


def test_every_metric_an_alert_names_is_one_the_service_declares() -> None:
    declared = "".join((ROOT / "app" / name).read_text() for name in ("observability.py", "rollout_metrics.py"))
    for name, rule in ALERTS.items():
        for metric in set(re.findall(r"\bfashion_serve_\w+", rule["expr"])):
            base = next((metric.removesuffix(s) for s in SUFFIXES if metric.endswith(s)), metric)
            assert f'"{base}"' in declared, (
                f"{name}: {metric} is not declared in app/observability.py or app/rollout_metrics.py"
            )


def test_every_alert_links_its_runbook_entry() -> None:
    runbook = (ROOT / "docs" / "operations.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9-]", "", h.strip().lower().replace(" ", "-")) for h in re.findall(r"^#+ (.+)$", runbook, re.M)
    }
    for name, rule in ALERTS.items():
        assert rule["annotations"]["runbook"] == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in headings, f"docs/operations.md has no section {name}"
        assert {"summary", "description"} <= set(rule["annotations"]) and rule["labels"]["severity"], name


def _replicas() -> set[str]:
    """The lb profile's replicas of the service image: what nginx balances over."""
    services: dict[str, Any] = COMPOSE["services"]
    return {
        name
        for name, service in services.items()
        if "lb" in service.get("profiles", []) and service.get("image") == services["api"]["image"]
    }


def test_prometheus_scrapes_every_lb_replica_on_the_port_the_app_serves() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    targets = {t for static in job["static_configs"] for t in static["targets"]}
    port = COMPOSE["services"]["api"]["ports"][0].rsplit(":", 1)[1]
    assert targets == {f"{name}:{port}" for name in _replicas()}
    assert job["metrics_path"] == "/metrics"
    assert config["rule_files"] == ["alerts.yml"]


def test_the_monitoring_profile_mounts_the_config_and_the_rules() -> None:
    service = COMPOSE["services"]["prometheus"]
    assert service["profiles"] == ["monitoring"]
    volumes = service["volumes"]
    assert "${PROMETHEUS_CONFIG:-./deploy/prometheus/prometheus.yml}:/etc/prometheus/prometheus.yml:ro" in volumes
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes
    assert "--config.file=/etc/prometheus/prometheus.yml" in service["command"]
