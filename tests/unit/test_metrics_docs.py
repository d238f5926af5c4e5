"""docs/metrics.md and docs/grafana-dashboard.json agree with what the collector exports,
and their PromQL is accepted (and the main alerts fire) under promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from turnserver.io.snapshot import take_snapshot
from turnserver.metrics import build_registry

from .test_metrics import FakePool, fake_server, full_streams
from .turn_harness import make_core

DOCS = Path(__file__).resolve().parents[2] / "docs"
METRICS_MD = DOCS / "metrics.md"
DASHBOARD = DOCS / "grafana-dashboard.json"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool (Debian package prometheus) not installed")


def exported() -> dict[str, str]:
    """Family name as written in the docs (counters with _total) -> type, everything present."""
    h = make_core()
    server = fake_server(h.core, streams=full_streams(), tls_not_after=2e9)
    server.relays = FakePool()
    text = generate_latest(build_registry(server)).decode()
    # With worker processes, the parent adds the per-worker families.
    workers = [take_snapshot(server, worker=0), take_snapshot(server, worker=1)]
    text += generate_latest(build_registry(lambda: workers)).decode()
    names = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        names[name] = family.type
    return names


def documented() -> dict[str, str]:
    rows = re.findall(r"^\| `([a-z_]+)` \| (gauge|counter) \|", METRICS_MD.read_text(), re.M)
    return dict(rows)


def rules_yaml() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", METRICS_MD.read_text(), re.S)
    rules = [b for b in blocks if b.startswith("groups:")]
    assert len(rules) == 1
    return rules[0]


def referenced_names(text: str) -> set[str]:
    return set(re.findall(r"\b((?:turn|process)_[a-z_]+)\b", text))


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_every_exported_metric_is_documented_with_its_type() -> None:
    docs, names = documented(), exported()
    assert names, "nothing exported"
    assert {n: t for n, t in docs.items() if n in names} == names


def test_docs_and_dashboard_name_only_metrics_that_exist() -> None:
    names = set(exported())
    text = METRICS_MD.read_text()
    assert referenced_names(text) - names == set()
    assert set(documented()) <= names
    assert referenced_names("\n".join(dashboard_exprs())) - names == set()


def test_the_dashboard_is_a_sound_grafana_dashboard() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] == "turnd" and dash["uid"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert "instance" in variables
    # Every relay panel can be narrowed to the chosen servers.
    assert all('instance=~"$instance"' in expr for expr in dashboard_exprs())


@needs_promtool
def test_promtool_accepts_the_alert_rules(tmp_path: Path) -> None:
    rules = tmp_path / "turnd-rules.yml"
    rules.write_text(rules_yaml())
    result = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert b"SUCCESS: 12 rules found" in result.stdout


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # Grafana's variables are not PromQL: give them concrete values, then let promtool parse
    # each query as a recording rule.
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(dashboard_exprs()):
        concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(concrete)}"]
    rules = tmp_path / "dashboard.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


ALERT_TESTS = """
rule_files: [turnd-rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'turn_allocations_refused_total{job="turnd", instance="a:9641", reason="capacity"}'
        values: '0 0 0 3 6 9 12 15 18 21 24 27 30 33 36 39 42 45 48 51 54 57 60 63 66'
      - series: 'turn_allocations_created_total{job="turnd", instance="a:9641", transport="udp", family="ipv4"}'
        values: '5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5'
      - series: 'turn_relay_ports_in_use{job="turnd", instance="a:9641"}'
        values: '100 900 900 900 900 900 900 900 900 900 900 900 900 900 900 900 900 900 900 900 900 900 900 900 900'
      - series: 'turn_relay_ports_capacity{job="turnd", instance="a:9641"}'
        values: '1000+0x24'
      - series: 'turn_tls_certificate_not_after_timestamp_seconds{job="turnd", instance="a:9641"}'
        values: '86400+0x24'
      - series: 'up{job="turnd", instance="a:9641"}'
        values: '1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 2m
        alertname: TurnAllocationsRefusedForCapacity
        exp_alerts: []
      - eval_time: 5m
        alertname: TurnAllocationsRefusedForCapacity
        exp_alerts:
          - exp_labels: {severity: warning, instance: "a:9641"}
            exp_annotations:
              summary: "turnd on a:9641 refuses allocations for lack of capacity"
              description: "9 Allocate requests in 5 minutes got 508 (no relay port, or max_allocations reached): calls relying on this server fail."
      - eval_time: 24m
        alertname: TurnNoAllocationsPossible
        exp_alerts:
          - exp_labels: {severity: critical, instance: "a:9641"}
            exp_annotations:
              summary: "No allocation is possible on turnd a:9641"
              description: "Allocate requests keep failing for lack of capacity and none has succeeded for 15 minutes: every call that needs this relay fails."
      - eval_time: 4m
        alertname: TurnRelayPortsNearlyExhausted
        exp_alerts: []
      - eval_time: 7m
        alertname: TurnRelayPortsNearlyExhausted
        exp_alerts:
          - exp_labels: {severity: warning, instance: "a:9641", job: turnd}
            exp_annotations:
              summary: "turnd on a:9641 uses 90% of its relay ports"
              description: "Widen relay_port_min..relay_port_max, add a relay address, or add a server before allocations start failing with 508."
      - eval_time: 2m
        alertname: TurnTlsCertificateExpiringVerySoon
        exp_alerts:
          - exp_labels: {severity: critical, instance: "a:9641", job: turnd}
            exp_annotations:
              summary: "The TLS certificate of turnd on a:9641 expires in 23h 58m 0s"
              description: "turns: clients (browsers verify the certificate) fail once it has expired."
      - eval_time: 2m
        alertname: TurndDown
        exp_alerts: []
      - eval_time: 4m
        alertname: TurndDown
        exp_alerts:
          - exp_labels: {severity: critical, instance: "a:9641", job: turnd}
            exp_annotations:
              summary: "turnd on a:9641 cannot be scraped"
              description: "The metrics endpoint has not answered for a minute: the server is down, hung, or its metrics port is blocked."
"""


@needs_promtool
def test_the_main_alerts_fire_when_they_should_and_not_before(tmp_path: Path) -> None:
    (tmp_path / "turnd-rules.yml").write_text(rules_yaml())
    tests = tmp_path / "turnd-rules.test.yml"
    tests.write_text(ALERT_TESTS)
    result = subprocess.run(["promtool", "test", "rules", tests.name], cwd=tmp_path, capture_output=True,
                            timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
