"""The chart renders with the real Helm engine, lints clean in strict mode, and
turns each value set into the objects the deployment needs."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import pytest

from tests.k8s.chart import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    VALUE_FILES,
    Rendered,
    containers,
    fullname,
    load_values,
    name_of,
    pod_spec,
    render,
    render_raw,
    render_set,
    secret_files,
)

FULL = fullname()


def secret_value(secret: dict[str, Any], key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


@pytest.mark.parametrize("value_set", list(VALUE_FILES))
def test_renders_every_value_set(value_set: str) -> None:
    rendered = render_set(value_set)
    assert rendered.objects, "nothing rendered"
    seen: set[tuple[str, str]] = set()
    for obj in rendered.everything:
        assert {"apiVersion", "kind", "metadata"} <= obj.keys()
        key = (obj["kind"], name_of(obj))
        assert key not in seen, f"{key} rendered twice"
        seen.add(key)
        # Every object lives in the release's namespace (so that `helm template |
        # kubectl apply` lands there too), never in one a template names.
        assert obj["metadata"].get("namespace") == NAMESPACE, key
        assert len(name_of(obj)) <= 63, key
    assert "port-forward" in rendered.notes or "ws" in rendered.notes


@pytest.mark.parametrize("value_set", list(VALUE_FILES))
def test_lints_clean_in_strict_mode(value_set: str) -> None:
    report = helm.lint(
        CHART,
        load_values(value_set),
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSION}",
    )
    assert report["errors"] == []
    # Severity 1 is informational (e.g. "icon is recommended"); strict mode fails on 2+.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"edge": {"replicass": 3}}, "replicass"),
        ({"channel": {"replicas": 0}}, "/channel/replicas"),
        ({"securityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem"),
        ({"config": {"jwtAlgorithms": ["none"]}}, "jwtAlgorithms"),
        ({"config": {"extra": {"lower_case": "x"}}}, "lower_case"),
        # null deletes a default in Helm: a container without a memory limit.
        ({"edge": {"resources": {"limits": {"memory": None}}}}, "/edge/resources/limits"),
        ({"database": {"url": "mysql://db/waddle"}}, "/database/url"),
    ],
)
def test_values_schema_rejects_mistakes(values: dict[str, Any], fragment: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=fragment):
        render_raw(values)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"postgresql": {"enabled": False}}, "the store needs a database"),
        (
            {"database": {"url": "postgresql+psycopg://u:p@db:5432/w"}},
            "choose one database",
        ),
        (
            {"edge": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}},
            "minReplicas must not exceed",
        ),
    ],
)
def test_templates_refuse_inconsistent_values(values: dict[str, Any], fragment: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=fragment):
        render_raw(values)


EXPECTED: dict[str, set[tuple[str, str]]] = {
    "common": {
        ("ConfigMap", FULL),
        ("Deployment", f"{FULL}-edge"),
        ("Service", f"{FULL}-edge"),
        ("StatefulSet", f"{FULL}-channel"),
        ("Service", f"{FULL}-channel"),
        ("Deployment", f"{FULL}-store"),
        ("Service", f"{FULL}-store"),
        ("Job", f"{FULL}-migrate"),
    },
    "default": {
        ("Secret", FULL),
        ("HorizontalPodAutoscaler", f"{FULL}-edge"),
        ("PodDisruptionBudget", f"{FULL}-edge"),
        ("PodDisruptionBudget", f"{FULL}-channel"),
        ("StatefulSet", f"{FULL}-postgresql"),
        ("NetworkPolicy", f"{FULL}-edge"),
        ("NetworkPolicy", f"{FULL}-channel"),
        ("NetworkPolicy", f"{FULL}-store"),
        ("NetworkPolicy", f"{FULL}-postgresql"),
        ("ConfigMap", f"{FULL}-dashboards"),
    },
    "production": {
        ("Ingress", f"{FULL}-edge"),
        ("HorizontalPodAutoscaler", f"{FULL}-edge"),
        ("ServiceMonitor", f"{FULL}-edge"),
        ("ServiceMonitor", f"{FULL}-channel"),
        ("ServiceMonitor", f"{FULL}-store"),
        ("ConfigMap", f"{FULL}-dashboards"),
    },
    "minimal": {("Secret", FULL), ("StatefulSet", f"{FULL}-postgresql")},
    "kind": {
        ("Secret", FULL),
        ("Deployment", f"{FULL}-prometheus"),
        ("Deployment", f"{FULL}-grafana"),
        ("ConfigMap", f"{FULL}-grafana"),
        ("ConfigMap", f"{FULL}-prometheus"),
        ("ConfigMap", f"{FULL}-dashboards"),
        ("NetworkPolicy", f"{FULL}-prometheus"),
    },
}
ABSENT: dict[str, set[str]] = {
    "production": {"StatefulSet/" + f"{FULL}-postgresql", "Deployment/" + f"{FULL}-grafana"},
    "minimal": {
        "HorizontalPodAutoscaler/" + f"{FULL}-edge",
        "PodDisruptionBudget/" + f"{FULL}-edge",
        "PodDisruptionBudget/" + f"{FULL}-channel",
        "NetworkPolicy/" + f"{FULL}-edge",
        "ConfigMap/" + f"{FULL}-dashboards",
        "Ingress/" + f"{FULL}-edge",
    },
    "default": {"Ingress/" + f"{FULL}-edge", "Deployment/" + f"{FULL}-prometheus"},
}


@pytest.mark.parametrize("value_set", list(VALUE_FILES))
def test_each_value_set_has_its_objects(value_set: str) -> None:
    rendered = render_set(value_set)
    present = {(o["kind"], name_of(o)) for o in rendered.everything}
    missing = (EXPECTED["common"] | EXPECTED[value_set]) - present
    assert not missing, f"missing from {value_set}: {sorted(missing)}"
    unwanted = {f"{k}/{n}" for k, n in present} & ABSENT.get(value_set, set())
    assert not unwanted, f"{value_set} should not render {sorted(unwanted)}"


def test_autoscaled_edge_leaves_replicas_to_the_autoscaler() -> None:
    default = render_set("default").get("Deployment", f"{FULL}-edge")
    assert "replicas" not in default["spec"]
    minimal = render_set("minimal").get("Deployment", f"{FULL}-edge")
    assert minimal["spec"]["replicas"] == 1


def migrate_job(rendered: Rendered) -> dict[str, Any]:
    return rendered.get("Job", f"{FULL}-migrate")


def test_external_database_migrates_in_a_pre_install_and_pre_upgrade_hook() -> None:
    rendered = render_set("production")
    job = migrate_job(rendered)
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    (container,) = containers(job)
    assert container["command"] == ["python", "-m", "store_service.migrate"]
    files = secret_files(job, container)
    assert files == {"WADDLE_DATABASE_URL": ("waddle-database", "database-url")}
    # The release's ServiceAccount does not exist before a pre-install hook.
    assert "serviceAccountName" not in pod_spec(job)
    assert pod_spec(job)["restartPolicy"] == "Never"
    store = rendered.get("Deployment", f"{FULL}-store")
    assert "initContainers" not in pod_spec(store)


def test_inline_database_url_reaches_the_hook_through_a_hook_secret() -> None:
    url = "postgresql+psycopg://waddle:s3cret@db.example.com:5432/waddle"
    rendered = render({"postgresql": {"enabled": False}, "database": {"url": url}})
    hook_secret = rendered.get("Secret", f"{FULL}-migrate")
    annotations = hook_secret["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    # Created before the Job of the same hook phase.
    job = migrate_job(rendered)
    assert int(annotations["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    assert secret_value(hook_secret, "database-url") == url
    assert secret_value(rendered.get("Secret", FULL), "database-url") == url


def test_in_chart_postgresql_migrates_before_the_store_starts() -> None:
    rendered = render_set("default")
    job = migrate_job(rendered)
    # The database is created with the release: no pre-install hook can reach it.
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-upgrade"
    store = rendered.get("Deployment", f"{FULL}-store")
    (init,) = pod_spec(store)["initContainers"]
    assert "python -m store_service.migrate" in " ".join(init["command"])
    (main,) = containers(store)
    files = secret_files(store, main)
    assert files == {"WADDLE_DATABASE_URL": (FULL, "database-url")}
    assert secret_files(store, init) == files


def test_generated_credentials_agree_across_objects() -> None:
    rendered = render_set("default")
    password = secret_value(rendered.get("Secret", f"{FULL}-postgresql"), "password")
    assert len(password) >= 24
    store_url = urlsplit(secret_value(rendered.get("Secret", FULL), "database-url"))
    hook_url = urlsplit(secret_value(rendered.get("Secret", f"{FULL}-migrate"), "database-url"))
    assert store_url == hook_url
    assert store_url.scheme == "postgresql+psycopg"
    assert store_url.password == password
    assert store_url.hostname == f"{FULL}-postgresql.{NAMESPACE}.svc.cluster.local"
    assert store_url.port == 5432
    assert len(secret_value(rendered.get("Secret", FULL), "jwt-secret")) >= 32


def test_explicit_jwt_secret_is_used_and_existing_secret_is_referenced() -> None:
    rendered = render({"jwt": {"secret": "k" * 40}})
    assert secret_value(rendered.get("Secret", FULL), "jwt-secret") == "k" * 40

    production = render_set("production")
    assert production.find("Secret", FULL) is None, "no credentials of its own to store"
    edge_deployment = production.get("Deployment", f"{FULL}-edge")
    (edge,) = containers(edge_deployment)
    assert secret_files(edge_deployment, edge) == {
        "WADDLE_JWT_SECRET": ("waddle-jwt", "jwt-secret")
    }


def test_ingress_keeps_websockets_open() -> None:
    ingress = render_set("production").get("Ingress", f"{FULL}-edge")
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{FULL}-edge", "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["hosts"] == ["chat.example.com"]

    custom = render(
        {
            "edge": {
                "ingress": {
                    "enabled": True,
                    "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "7200"},
                }
            }
        }
    ).get("Ingress", f"{FULL}-edge")
    assert custom["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"] == (
        "7200"
    )


def test_settings_changes_roll_the_pods() -> None:
    before = render({"jwt": {"secret": "a" * 40}, "postgresql": {"auth": {"password": "p"}}})
    after = render(
        {
            "jwt": {"secret": "a" * 40},
            "postgresql": {"auth": {"password": "p"}},
            "config": {"heartbeatSeconds": 31},
        }
    )
    for kind, name in [
        ("Deployment", f"{FULL}-edge"),
        ("StatefulSet", f"{FULL}-channel"),
        ("Deployment", f"{FULL}-store"),
    ]:
        old = before.get(kind, name)["spec"]["template"]["metadata"]["annotations"]
        new = after.get(kind, name)["spec"]["template"]["metadata"]["annotations"]
        assert old["checksum/config"] != new["checksum/config"], name
    again = render({"jwt": {"secret": "a" * 40}, "postgresql": {"auth": {"password": "p"}}})
    assert (
        again.get("Deployment", f"{FULL}-edge")["spec"]["template"]["metadata"]["annotations"]
        == before.get("Deployment", f"{FULL}-edge")["spec"]["template"]["metadata"]["annotations"]
    )


@pytest.mark.parametrize("value_set", list(VALUE_FILES))
def test_notes_tell_how_to_connect_and_get_a_token(value_set: str) -> None:
    notes = render_set(value_set).notes
    assert "jwt.encode" in notes
    assert "/channel/<channel-id>/websocket" in notes
    if value_set == "kind":
        assert f"port-forward service/{FULL}-grafana 3000:3000" in notes
        assert f"port-forward service/{FULL}-edge" in notes
