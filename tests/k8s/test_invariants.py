"""Cross-object invariants of the rendered chart that no schema can check.

Every container is probed, bounded and unprivileged; the shard list handed
to edges is exactly the channel StatefulSet's pods; every Service, policy,
budget and autoscaler points at pods that exist; ports agree between
Services, probes, containers, annotations and the WADDLE_* settings; pods
get more time to stop than the drain takes; credentials reach containers as
files from Secrets that exist, never as environment variables.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tests.k8s.chart import (
    NAMESPACE,
    VALUE_FILES,
    Obj,
    Rendered,
    containers,
    fullname,
    name_of,
    pod_labels,
    pod_spec,
    render,
    render_set,
    secret_files,
    volume_secrets,
)
from waddle_common.routing import owner_of
from waddle_common.settings import Settings

FULL = fullname()
SETS = list(VALUE_FILES)
LONG_RUNNING = ("Deployment", "StatefulSet")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_port(container: Obj, port: int | str) -> int:
    """Resolve a probe's or Service's port (a number or a name) on ``container``."""
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    numbers = {p["containerPort"] for p in container.get("ports", [])}
    if isinstance(port, str):
        assert port in ports, f"{container['name']} has no port named {port!r}"
        return int(ports[port])
    assert port in numbers, f"{container['name']} does not expose port {port}"
    return port


def probe_port(probe: Obj) -> int | str | None:
    for handler in ("httpGet", "grpc", "tcpSocket"):
        if handler in probe:
            port: int | str = probe[handler]["port"]
            return port
    assert "exec" in probe, f"probe without a handler: {probe}"
    return None


def pods_selected(rendered: Rendered, selector: dict[str, str]) -> list[Obj]:
    return [w for w in rendered.workloads() if selects(selector, pod_labels(w))]


# --- containers ----------------------------------------------------------------


@pytest.mark.parametrize("value_set", SETS)
def test_every_container_has_probes_resources_and_a_restrictive_security_context(
    value_set: str,
) -> None:
    rendered = render_set(value_set)
    checked = 0
    for workload in rendered.workloads():
        spec = pod_spec(workload)
        pod_sc = spec.get("securityContext", {})
        for container in containers(workload, init=True):
            where = f"{workload['kind']}/{name_of(workload)}/{container['name']}"
            is_main = container in spec["containers"]
            if workload["kind"] in LONG_RUNNING and is_main:
                for probe in ("livenessProbe", "readinessProbe"):
                    assert probe in container, f"{where} has no {probe}"
            resources = container.get("resources", {})
            assert resources.get("requests", {}).keys() >= {"cpu", "memory"}, where
            assert "memory" in resources.get("limits", {}), where
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert "privileged" not in sc, where
            assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("value_set", SETS)
def test_read_only_containers_get_a_writable_tmp(value_set: str) -> None:
    rendered = render_set(value_set)
    waddle_image = rendered.values["image"]["repository"] + ":"
    for workload in rendered.workloads():
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        for container in containers(workload, init=True):
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            for name in mounts.values():
                assert name in volumes or any(
                    t["metadata"]["name"] == name
                    for t in workload["spec"].get("volumeClaimTemplates", [])
                ), f"{name_of(workload)}: volume {name} is not defined"
            # Python, SQLite, Alembic and aiohttp may all want scratch space.
            if container["image"].startswith(waddle_image):
                assert "/tmp" in mounts, f"{name_of(workload)}/{container['name']}: no /tmp"
                assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("value_set", SETS)
def test_waddle_containers_run_the_documented_entrypoints(value_set: str) -> None:
    rendered = render_set(value_set)
    expected = {
        ("Deployment", f"{FULL}-edge"): ["python", "-m", "edge"],
        ("StatefulSet", f"{FULL}-channel"): ["python", "-m", "channel_service"],
        ("Deployment", f"{FULL}-store"): ["python", "-m", "store_service"],
        ("Job", f"{FULL}-migrate"): ["python", "-m", "store_service.migrate"],
    }
    for (kind, name), command in expected.items():
        (container,) = containers(rendered.get(kind, name))
        assert container["command"] == command
        assert container["image"].startswith(rendered.values["image"]["repository"] + ":")


# --- the shard list ------------------------------------------------------------


@pytest.mark.parametrize("replicas", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("namespace", [NAMESPACE, "team-b"])
def test_shard_list_is_exactly_the_statefulset_pods(
    replicas: int, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = render(
        {"channel": {"replicas": replicas, "membership": "static"}}, namespace=namespace
    )
    sts = rendered.get("StatefulSet", f"{FULL}-channel")
    assert sts["spec"]["replicas"] == replicas
    headless = rendered.get("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert selects(headless["spec"]["selector"], pod_labels(sts))
    (channel,) = containers(sts)
    grpc_port = container_port(channel, "grpc")

    shards = rendered.config()["WADDLE_CHANNEL_SHARDS"].split(",")
    expected = [
        f"{name_of(sts)}-{i}.{name_of(headless)}.{namespace}.svc.cluster.local:{grpc_port}"
        for i in range(replicas)
    ]
    assert shards == expected
    # What edges and shards parse is the same list, in pod order.
    monkeypatch.setenv("WADDLE_CHANNEL_SHARDS", rendered.config()["WADDLE_CHANNEL_SHARDS"])
    parsed = Settings()
    assert list(parsed.shard_list) == expected
    # Rendezvous hashing over these names gives every pod a share of channels.
    owners = Counter(owner_of(f"channel-{n}", parsed.shard_list) for n in range(300 * replicas))
    assert set(owners) == set(expected)


def test_cluster_domain_reaches_every_address() -> None:
    config = render({"clusterDomain": "corp.internal"}).config()
    for address in [*config["WADDLE_CHANNEL_SHARDS"].split(","), config["WADDLE_STORE_ADDRESS"]]:
        assert address.rsplit(":", 1)[0].endswith(f".{NAMESPACE}.svc.corp.internal"), address


# --- Services, ports and settings ------------------------------------------------


@pytest.mark.parametrize("value_set", SETS)
def test_every_service_selects_pods_that_exist_on_matching_ports(value_set: str) -> None:
    rendered = render_set(value_set)
    services = rendered.of_kind("Service")
    assert len(services) >= 3
    for service in services:
        backends = pods_selected(rendered, service["spec"]["selector"])
        assert len(backends) == 1, f"Service/{name_of(service)} selects {len(backends)} workloads"
        (workload,) = backends
        pod_containers = containers(workload)
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(
                target in {p.get("name"), p["containerPort"]}
                for c in pod_containers
                for p in c.get("ports", [])
            ), f"Service/{name_of(service)} port {port['name']} -> {target}: no such container port"


@pytest.mark.parametrize("value_set", SETS)
def test_probes_point_at_container_ports(value_set: str) -> None:
    for workload in render_set(value_set).workloads():
        for container in containers(workload):
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                if kind in container:
                    port = probe_port(container[kind])
                    if port is not None:
                        container_port(container, port)


def test_probes_use_the_documented_health_endpoints() -> None:
    rendered = render_set("default")
    (edge,) = containers(rendered.get("Deployment", f"{FULL}-edge"))
    assert edge["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert edge["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind, name in [("StatefulSet", f"{FULL}-channel"), ("Deployment", f"{FULL}-store")]:
        (container,) = containers(rendered.get(kind, name))
        for probe in ("livenessProbe", "readinessProbe"):
            assert container_port(container, container[probe]["grpc"]["port"]) == (
                container_port(container, "grpc")
            ), f"{name} {probe} is not a grpc.health.v1 check on the gRPC port"


@pytest.mark.parametrize("value_set", SETS)
def test_settings_agree_with_containers_and_services(value_set: str) -> None:
    rendered = render_set(value_set)
    config = rendered.config()
    (edge,) = containers(rendered.get("Deployment", f"{FULL}-edge"))
    (channel,) = containers(rendered.get("StatefulSet", f"{FULL}-channel"))
    (store,) = containers(rendered.get("Deployment", f"{FULL}-store"))
    assert int(config["WADDLE_EDGE_PORT"]) == container_port(edge, "http")
    assert int(config["WADDLE_CHANNEL_PORT"]) == container_port(channel, "grpc")
    assert int(config["WADDLE_CHANNEL_METRICS_PORT"]) == container_port(channel, "metrics")
    assert int(config["WADDLE_STORE_PORT"]) == container_port(store, "grpc")
    assert int(config["WADDLE_STORE_METRICS_PORT"]) == container_port(store, "metrics")
    for host in ("WADDLE_EDGE_HOST", "WADDLE_CHANNEL_HOST", "WADDLE_STORE_HOST"):
        assert config[host] in {"0.0.0.0", "::"}, f"{host} would not be reachable from other pods"

    store_service = rendered.get("Service", f"{FULL}-store")
    host, port = config["WADDLE_STORE_ADDRESS"].rsplit(":", 1)
    assert host == f"{name_of(store_service)}.{NAMESPACE}.svc.cluster.local"
    grpc = next(p for p in store_service["spec"]["ports"] if p["name"] == "grpc")
    assert int(port) == grpc["port"]


@pytest.mark.parametrize("value_set", SETS)
def test_every_waddle_setting_is_one_the_services_read(
    value_set: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    known = {f"WADDLE_{name.upper()}" for name in Settings.model_fields}
    rendered = render_set(value_set)
    names = [k for k in rendered.config() if k.startswith("WADDLE_")]
    for workload in rendered.workloads():
        for container in containers(workload, init=True):
            names += [
                e["name"] for e in container.get("env", []) if e["name"].startswith("WADDLE_")
            ]
            names += list(secret_files(workload, container))
    unknown = sorted(set(names) - known)
    assert not unknown, f"settings no service reads: {unknown}"
    # And the values parse the way the services read them: from the environment.
    for key, value in rendered.config().items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.channel_port == int(rendered.config()["WADDLE_CHANNEL_PORT"])


@pytest.mark.parametrize("value_set", SETS)
def test_env_references_resolve(value_set: str) -> None:
    rendered = render_set(value_set)
    values = rendered.values
    external = {values["jwt"]["existingSecret"], values["database"]["existingSecret"]} - {""}
    for workload in rendered.workloads():
        spec = pod_spec(workload)
        for container in containers(workload, init=True):
            for source in container.get("envFrom", []):
                name = source["configMapRef"]["name"]
                assert rendered.find("ConfigMap", name), f"missing ConfigMap {name}"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is None:
                    continue
                if ref["name"] in external:
                    continue
                secret = rendered.find("Secret", ref["name"])
                assert secret is not None, f"{name_of(workload)}: missing Secret {ref['name']}"
                assert ref["key"] in secret["data"], f"Secret {ref['name']} has no {ref['key']}"
        for name, key in volume_secrets(workload):
            if name in external:
                continue
            secret = rendered.find("Secret", name)
            assert secret is not None, f"{name_of(workload)}: volume of missing Secret {name}"
            assert key is None or key in secret["data"], f"Secret {name} has no {key}"
        account = spec.get("serviceAccountName")
        if account and values["serviceAccount"]["create"]:
            assert rendered.find("ServiceAccount", account), f"missing ServiceAccount {account}"


@pytest.mark.parametrize("value_set", SETS)
def test_credentials_are_files_never_environment_variables(value_set: str) -> None:
    rendered = render_set(value_set)
    for workload in rendered.workloads():
        for container in containers(workload, init=True):
            refs = [
                e["name"]
                for e in container.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            ]
            assert refs == [], f"{name_of(workload)}/{container['name']}: secrets as env {refs}"
            for source in container.get("envFrom", []):
                assert "secretRef" not in source, f"{name_of(workload)}/{container['name']}"
    edge = rendered.get("Deployment", f"{FULL}-edge")
    assert set(secret_files(edge, containers(edge)[0])) == {"WADDLE_JWT_SECRET"}
    store = rendered.get("Deployment", f"{FULL}-store")
    for container in containers(store, init=True):
        assert set(secret_files(store, container)) == {"WADDLE_DATABASE_URL"}
    channel = rendered.get("StatefulSet", f"{FULL}-channel")
    assert secret_files(channel, containers(channel)[0]) == {}, "the channel needs no credential"


@pytest.mark.parametrize("value_set", SETS)
def test_scrape_annotations_name_a_container_port(value_set: str) -> None:
    rendered = render_set(value_set)
    annotated = 0
    for workload in rendered.workloads():
        annotations = workload["spec"]["template"]["metadata"].get("annotations") or {}
        if annotations.get("prometheus.io/scrape") != "true":
            continue
        port = int(annotations["prometheus.io/port"])
        assert any(
            p["containerPort"] == port for c in containers(workload) for p in c.get("ports", [])
        ), name_of(workload)
        assert annotations["prometheus.io/path"] == "/metrics"
        annotated += 1
    assert annotated == (3 if rendered.values["metrics"]["podAnnotations"] else 0)


def test_service_monitors_select_services_with_the_named_port() -> None:
    rendered = render_set("production")
    monitors = rendered.of_kind("ServiceMonitor")
    assert len(monitors) == 3
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [
            s for s in rendered.of_kind("Service") if selects(selector, s["metadata"]["labels"])
        ]
        assert len(services) == 1, name_of(monitor)
        port_names = {p["name"] for p in services[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names
            assert endpoint["path"] == "/metrics"


# --- lifecycle -------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [{}, {"config": {"shutdownGraceSeconds": 45}}, {"config": {"shutdownGraceSeconds": 2.5}}],
)
def test_termination_grace_exceeds_the_drain(values: dict[str, Any]) -> None:
    rendered = render(values)
    drain = float(rendered.values["config"]["shutdownGraceSeconds"])
    assert float(rendered.config()["WADDLE_SHUTDOWN_GRACE_SECONDS"]) == drain
    for kind, name in [
        ("Deployment", f"{FULL}-edge"),
        ("StatefulSet", f"{FULL}-channel"),
        ("Deployment", f"{FULL}-store"),
    ]:
        spec = pod_spec(rendered.get(kind, name))
        (container,) = spec["containers"]
        pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert spec["terminationGracePeriodSeconds"] > pause + drain, name


@pytest.mark.parametrize("value_set", SETS)
def test_budgets_and_autoscalers_target_real_workloads(value_set: str) -> None:
    rendered = render_set(value_set)
    for pdb in rendered.of_kind("PodDisruptionBudget"):
        assert len(pods_selected(rendered, pdb["spec"]["selector"]["matchLabels"])) == 1
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        deployment = rendered.get(target["kind"], target["name"])
        assert "replicas" not in deployment["spec"]
        (container,) = containers(deployment)
        assert "cpu" in container["resources"]["requests"], "CPU utilisation needs a request"
    for workload in rendered.workloads():
        if workload["kind"] in LONG_RUNNING:
            assert selects(workload["spec"]["selector"]["matchLabels"], pod_labels(workload))


# --- network policies ------------------------------------------------------------


def ingress_sources(rendered: Rendered, component: str, port: str) -> list[Obj] | None:
    """The peers allowed to reach ``port`` of ``component``; None means anyone."""
    workload = next(
        w
        for w in rendered.workloads()
        if pod_labels(w).get("app.kubernetes.io/component") == component
    )
    peers: list[Obj] = []
    governed = False
    for policy in rendered.of_kind("NetworkPolicy"):
        if not selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(workload)):
            continue
        governed = True
        for rule in policy["spec"].get("ingress", []):
            if not any(p["port"] == port for p in rule.get("ports", [])):
                continue
            if "from" not in rule:
                return None
            peers += rule["from"]
    assert governed, f"no NetworkPolicy selects {component}"
    return peers


def peer_components(rendered: Rendered, peers: list[Obj]) -> set[str]:
    found: set[str] = set()
    for peer in peers:
        selector = peer["podSelector"]["matchLabels"]
        matched = pods_selected(rendered, selector)
        assert matched, f"a NetworkPolicy peer selects no pods: {selector}"
        found |= {pod_labels(w)["app.kubernetes.io/component"] for w in matched}
    return found


@pytest.mark.parametrize("value_set", ["default", "kind"])
def test_only_the_edge_is_reachable_from_outside(value_set: str) -> None:
    rendered = render_set(value_set)
    assert ingress_sources(rendered, "edge", "http") is None
    channel = ingress_sources(rendered, "channel", "grpc")
    assert channel is not None and peer_components(rendered, channel) == {"edge"}
    store = ingress_sources(rendered, "store", "grpc")
    assert store is not None and peer_components(rendered, store) == {"edge", "channel"}
    database = ingress_sources(rendered, "postgresql", "postgresql")
    assert database is not None and peer_components(rendered, database) == {"store", "migrate"}
    for component in ("channel", "store"):
        scrapers = ingress_sources(rendered, component, "metrics")
        if value_set == "kind":
            assert scrapers is not None
            assert peer_components(rendered, scrapers) == {"prometheus"}
        else:
            assert scrapers == [], "metrics ports open although nobody scrapes them"
    if value_set == "kind":
        grafana = ingress_sources(rendered, "grafana", "http")
        assert grafana == [], "Grafana is reached through port-forward only"
        prometheus = ingress_sources(rendered, "prometheus", "http")
        assert prometheus is not None and peer_components(rendered, prometheus) == {"grafana"}


def test_restricted_edge_sources_still_admit_the_scrapers() -> None:
    rendered = render_set("production")
    edge = ingress_sources(rendered, "edge", "http")
    assert edge is not None
    namespaces = {
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in edge
    }
    assert namespaces == {"ingress-nginx", "monitoring"}
