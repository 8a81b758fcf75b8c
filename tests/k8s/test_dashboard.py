"""The Grafana dashboard: what it shows, how the chart provisions it, and that
every metric it queries is exported by the running services."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.k8s.chart import CHART, NAMESPACE, containers, fullname, pod_spec, render_set
from tests.support.client import WsClient
from tests.support.stack import start_stack

FULL = fullname()
DASHBOARD = CHART / "dashboards" / "waddle.json"
METRIC = re.compile(r"\bwaddle_[a-z0-9_]+\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# The metric contract of the services (README / the deployment issue).
DOCUMENTED = {
    "edge": {
        "waddle_edge_connections",
        "waddle_edge_connects_total",
        "waddle_edge_refusals_total",
        "waddle_edge_frames_in_total",
        "waddle_edge_frames_out_total",
        "waddle_edge_fanout_latency_seconds",
        "waddle_edge_slow_consumer_closes_total",
        "waddle_edge_dropped_frames_total",
        "waddle_edge_ring_shards",
        "waddle_edge_known_shards",
        "waddle_edge_ring_changes_total",
        "waddle_edge_channels_moved_total",
        "waddle_edge_failover_seconds",
        "waddle_grpc_client_seconds",
    },
    "channel": {
        "waddle_channel_active_channels",
        "waddle_channel_members",
        "waddle_channel_publishes_total",
        "waddle_channel_broadcast_edges",
        "waddle_channel_edge_streams",
        "waddle_channel_stream_reconnects_total",
        "waddle_channel_hibernated_channels",
        "waddle_channel_hibernations_total",
        "waddle_channel_wakes_total",
        "waddle_channel_wake_seconds",
        "waddle_channel_loads_total",
        # Its only server method is the Attach stream, which is not a latency:
        # the server histogram covers unary methods (the store's).
        "waddle_grpc_client_seconds",
    },
    "store": {
        "waddle_store_append_batch_size",
        "waddle_store_append_seconds",
        "waddle_store_query_seconds",
        "waddle_store_errors_total",
        "waddle_grpc_server_seconds",
    },
}


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(board) for t in p.get("targets", [])]


def metric_names(board: dict[str, Any]) -> set[str]:
    return {m for expr in expressions(board) for m in METRIC.findall(expr)}


def family(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "waddle-realtime"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_dashboard_queries_only_documented_metrics() -> None:
    documented = set().union(*DOCUMENTED.values())
    queried = {family(m) for m in metric_names(dashboard())}
    assert queried <= documented, f"undocumented: {sorted(queried - documented)}"
    # Everything the services document is on the dashboard somewhere.
    assert documented <= queried, f"not shown: {sorted(documented - queried)}"


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = expressions(dashboard())
    fanout = [e for e in exprs if "waddle_edge_fanout_latency_seconds_bucket" in e]
    quantiles = {float(q) for e in fanout for q in re.findall(r"histogram_quantile\(([0-9.]+)", e)}
    assert {0.5, 0.95, 0.99} <= quantiles
    wanted = {
        "messages/s": "rate(waddle_channel_publishes_total",
        "connections": "waddle_edge_connections",
        "refusals": "rate(waddle_edge_refusals_total",
        "store errors": "rate(waddle_store_errors_total",
        "gRPC errors": 'waddle_grpc_server_seconds_count{code!="OK"}',
        "database latency": "rate(waddle_store_append_seconds_bucket",
        "query latency": "rate(waddle_store_query_seconds_bucket",
    }
    for what, fragment in wanted.items():
        assert any(fragment in e for e in exprs), f"no panel for {what}"


def test_chart_ships_the_dashboard_file_unchanged() -> None:
    for value_set in ("default", "kind", "production"):
        cm = render_set(value_set).get("ConfigMap", f"{FULL}-dashboards")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"]["waddle.json"]) == dashboard()


def test_bundled_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    rendered = render_set("kind")
    provisioning = rendered.get("ConfigMap", f"{FULL}-grafana")["data"]
    datasources = yaml.safe_load(provisioning["datasources.yaml"])["datasources"]
    (source,) = datasources
    prometheus = rendered.get("Service", f"{FULL}-prometheus")
    port = prometheus["spec"]["ports"][0]["port"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == f"http://{FULL}-prometheus.{NAMESPACE}.svc.cluster.local:{port}"

    grafana = rendered.get("Deployment", f"{FULL}-grafana")
    (container,) = containers(grafana)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(grafana)["volumes"]}
    (provider,) = yaml.safe_load(provisioning["dashboards.yaml"])["providers"]
    dash_mount = mounts[provider["options"]["path"]]
    assert volumes[dash_mount["name"]]["configMap"]["name"] == f"{FULL}-dashboards"
    home = next(
        e for e in container["env"] if e["name"] == "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    )
    assert Path(home["value"]).parent == Path(provider["options"]["path"])
    assert Path(home["value"]).name == DASHBOARD.name
    for file in ("datasources", "dashboards"):
        mount = mounts[f"/etc/grafana/provisioning/{file}/{file}.yaml"]
        assert volumes[mount["name"]]["configMap"]["name"] == f"{FULL}-grafana"

    config = yaml.safe_load(
        rendered.get("ConfigMap", f"{FULL}-prometheus")["data"]["prometheus.yml"]
    )
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "waddle"]
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == [NAMESPACE]
    keep = job["relabel_configs"][0]
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    assert keep["action"] == "keep"


def exported_names(text: str) -> set[str]:
    """Every series name a scrape can produce, including families with no samples yet."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        if fam.type == "counter":
            names.add(fam.name + "_total")
        if fam.type == "histogram":
            names |= {fam.name + suffix for suffix in HISTOGRAM_SUFFIXES}
        names |= {sample.name for sample in fam.samples}
    return names


def sample_value(text: str, name: str) -> float:
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    )


@pytest.mark.e2e
@pytest.mark.timeout(90)
async def test_every_dashboard_metric_is_exported_by_a_running_service(tmp_path: Path) -> None:
    wanted = metric_names(dashboard())
    async with start_stack(tmp_path) as stack, aiohttp.ClientSession() as http:
        # One message through the whole path, so that latency series have samples.
        channel_id = f"dash-{uuid.uuid4().hex[:8]}"
        client = await WsClient.connect(http, stack.ws_url(channel_id), token=stack.token("u1"))
        first = await client.recv()
        assert first["type"] == "initial_state", first
        await client.send({"type": "message", "content": "hello", "clientMsgId": "m1"})
        seen: set[str] = set()
        while not {"ack", "message"} <= seen:  # either may come first
            seen.add((await client.recv())["type"])
        await client.close()

        exported: dict[str, set[str]] = {}
        texts: dict[str, str] = {}
        for service, url in stack.metrics_urls().items():
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
                assert response.status == 200, url
                texts[service] = await response.text()
            exported[service] = exported_names(texts[service])

    everywhere = set().union(*exported.values())
    missing = sorted(wanted - everywhere)
    assert not missing, f"queried by the dashboard but exported by no service: {missing}"
    for service, names in DOCUMENTED.items():
        absent = sorted(n for n in names if n not in exported[service])
        assert not absent, f"{service} does not export {absent}"
    assert sample_value(texts["edge"], "waddle_edge_fanout_latency_seconds_count") >= 1
    assert sample_value(texts["store"], "waddle_store_append_seconds_count") >= 1
