"""The chart's side of shard membership, drain and failover: edges follow the
headless Service's SRV records (or the static list), the channel pods have
time to drain, and the example alert rules speak of metrics the edge has."""

from __future__ import annotations

import re

import pytest

from edge.metrics import EdgeMetrics
from tests.k8s.chart import NAMESPACE, containers, fullname, pod_spec, render, render_set

NAMESPACE_DOMAIN = f"{NAMESPACE}.svc.cluster.local"


def test_edges_follow_the_srv_records_of_the_headless_service() -> None:
    rendered = render_set("default")
    config = rendered.config()
    headless = rendered.get("Service", f"{fullname()}-channel")
    assert headless["spec"]["clusterIP"] == "None"
    grpc_port = next(p for p in headless["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["protocol"] == "TCP"
    # SRV: _<port name>._<protocol>.<service>.<namespace>.svc.<cluster domain>
    assert config["WADDLE_CHANNEL_SHARDS_DNS"] == (
        f"_grpc._tcp.{name_of_service(headless)}.{NAMESPACE_DOMAIN}"
    )
    assert float(config["WADDLE_CHANNEL_SHARDS_DNS_SECONDS"]) > 0
    assert config["WADDLE_SHARD_DOWN_SECONDS"] == "3"
    assert config["WADDLE_SHARD_UP_SECONDS"] == "10"
    # The static list is only the edges' seed until DNS answers: pod 0, the
    # name its SRV record will have.
    assert config["WADDLE_CHANNEL_SHARDS"] == (
        f"{fullname()}-channel-0.{name_of_service(headless)}.{NAMESPACE_DOMAIN}:{grpc_port['port']}"
    )


def test_scaling_the_shards_rolls_no_edge_with_dns_membership() -> None:
    fixed = {"jwt": {"secret": "a" * 40}, "postgresql": {"auth": {"password": "p"}}}

    def edge_checksum(values: dict[str, object]) -> str:
        edge = render({**fixed, **values}).component("Deployment", "edge")
        return str(edge["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert edge_checksum({"channel": {"replicas": 2}}) == edge_checksum(
        {"channel": {"replicas": 5}}
    )
    static = {"membership": "static"}
    assert edge_checksum({"channel": {**static, "replicas": 2}}) != edge_checksum(
        {"channel": {**static, "replicas": 5}}
    )


def name_of_service(service: dict[str, object]) -> str:
    metadata = service["metadata"]
    assert isinstance(metadata, dict)
    return str(metadata["name"])


def test_static_membership_renders_no_dns_name() -> None:
    config = render({"channel": {"membership": "static"}}).config()
    assert "WADDLE_CHANNEL_SHARDS_DNS" not in config


@pytest.mark.parametrize("grace", [10, 30])
def test_channel_pods_get_the_drain_budget_and_no_prestop_pause(grace: int) -> None:
    rendered = render({"config": {"shutdownGraceSeconds": grace}})
    shards = rendered.component("StatefulSet", "channel")
    spec = pod_spec(shards)
    # The drain (settle, tell the edges, wait for them) is bounded by
    # WADDLE_SHUTDOWN_GRACE_SECONDS; SIGKILL must come later than that.
    assert spec["terminationGracePeriodSeconds"] > grace
    [container] = containers(shards)
    assert "preStop" not in container.get("lifecycle", {}), (
        "the drain is pushed, not learnt from endpoints"
    )


def test_alert_rules_use_metrics_the_edge_exports() -> None:
    rendered = render({"metrics": {"prometheusRule": {"enabled": True}}})
    [rule] = rendered.of_kind("PrometheusRule")
    exported = set()
    for family in EdgeMetrics().registry.collect():
        exported |= {sample.name for sample in family.samples}
        exported.add(family.name)
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert {r["alert"] for r in rules} == {
        "WaddleShardOutOfRing",
        "WaddleFailoverSlow",
        "WaddleRingFlapping",
    }
    for r in rules:
        expr = r["expr"]
        assert expr.count("(") == expr.count(")"), expr
        used = set(re.findall(r"\bwaddle_[a-z_]+", expr))
        assert used, expr
        missing = {
            m for m in used if m not in exported and m.removesuffix("_total") not in exported
        }
        assert not missing, f"{r['alert']}: no such metric {missing}"
    assert not render_set("default").of_kind("PrometheusRule"), "optional: off by default"
