"""edge.workers: several edge processes per pod, and where probes and scrapes go."""

from __future__ import annotations

from typing import Any

import pytest

from tests.k8s.chart import Rendered, containers, env_value, fullname, pod_spec, render

FULL = fullname()
MONITORED = {"monitoring": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}}


def edge_parts(rendered: Rendered) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = rendered.get("Deployment", f"{FULL}-edge")
    (container,) = containers(deployment)
    return deployment, container


def probe_ports(container: dict[str, Any]) -> set[str]:
    return {
        container[probe]["httpGet"]["port"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }


def test_one_worker_is_the_single_process_edge() -> None:
    rendered = render(MONITORED)
    _, container = edge_parts(rendered)
    assert env_value(container, "WADDLE_EDGE_WORKERS") == "1"
    assert env_value(container, "WADDLE_EDGE_OPS_PORT") is None
    assert [p["name"] for p in container["ports"]] == ["http"]
    assert probe_ports(container) == {"http"}
    monitor = rendered.get("ServiceMonitor", f"{FULL}-edge")
    assert monitor["spec"]["endpoints"][0]["port"] == "http"


@pytest.mark.parametrize("workers", [4, "auto"])
def test_several_workers_are_probed_and_scraped_through_their_supervisor(
    workers: int | str,
) -> None:
    rendered = render({**MONITORED, "edge": {"workers": workers, "opsPort": 9300}})
    deployment, container = edge_parts(rendered)
    assert env_value(container, "WADDLE_EDGE_WORKERS") == str(workers)
    assert env_value(container, "WADDLE_EDGE_OPS_PORT") == "9300"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "metrics": 9300}
    # A request to the shared port reaches any one worker: probes ask the supervisor.
    assert probe_ports(container) == {"metrics"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9300"
    service = rendered.get("Service", f"{FULL}-edge")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "http": "http",
        "metrics": "metrics",
    }
    monitor = rendered.get("ServiceMonitor", f"{FULL}-edge")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    policy = rendered.get("NetworkPolicy", f"{FULL}-edge")
    admitted = [port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]]
    assert admitted == ["http", "metrics"]
    assert pod_spec(deployment)["containers"][0]["command"] == ["python", "-m", "edge"]


@pytest.mark.parametrize("workers", [0, "many", 1.5])
def test_values_schema_refuses_a_bad_worker_count(workers: object) -> None:
    with pytest.raises(Exception, match="workers"):
        render({"edge": {"workers": workers}})
