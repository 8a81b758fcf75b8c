"""Render the Helm chart offline with the real Helm engine and index what comes out.

``render`` runs the chart through PyPI ``helm-python-sdk`` (Helm's own Go
template engine, values schema included) and parses every manifest into a
``Rendered``: the objects, the hook objects and NOTES.txt, with lookups by
kind and name and the pod templates of every workload. Results are cached
per value set because the tests only read them.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "k8s" / "charts" / "waddle"
VALUES_DIR = ROOT / "k8s" / "values"
RELEASE = "rel"
NAMESPACE = "chat"
KUBE_VERSION = "1.34.0"

# Named value sets every structural test runs against: the chart's defaults
# and the example files under k8s/values/.
VALUE_FILES: dict[str, Path | None] = {
    "default": None,
    "production": VALUES_DIR / "production.yaml",
    "minimal": VALUES_DIR / "minimal.yaml",
    "kind": VALUES_DIR / "kind.yaml",
}

# Value combinations beyond those files that turn on the remaining objects.
COMBINATIONS: dict[str, dict[str, Any]] = {
    "inline-database-url": {
        "postgresql": {"enabled": False},
        "database": {"url": "postgresql://u:p@db/w"},
    },
    "ingress-no-policies": {
        "edge": {"ingress": {"enabled": True}},
        "networkPolicy": {"enabled": False},
    },
    "everything-on": {
        "monitoring": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    },
    "many-shards": {"channel": {"replicas": 7}, "imagePullSecrets": [{"name": "regcred"}]},
    "edge-workers": {
        "edge": {"workers": 4},
        "monitoring": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
}

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "DaemonSet")

Obj = dict[str, Any]


@dataclass
class Rendered:
    objects: list[Obj]
    hooks: list[Obj]
    notes: str
    values: dict[str, Any]

    @property
    def everything(self) -> list[Obj]:
        return [*self.objects, *self.hooks]

    def of_kind(self, kind: str, *, hooks: bool = True) -> list[Obj]:
        pool = self.everything if hooks else self.objects
        return [o for o in pool if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Obj:
        matches = [o for o in self.everything if o["kind"] == kind and name_of(o) == name]
        assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
        return matches[0]

    def find(self, kind: str, name: str) -> Obj | None:
        matches = [o for o in self.everything if o["kind"] == kind and name_of(o) == name]
        return matches[0] if matches else None

    def workloads(self) -> list[Obj]:
        return [o for o in self.everything if o["kind"] in WORKLOAD_KINDS]

    def component(self, kind: str, component: str) -> Obj:
        matches = [
            o
            for o in self.everything
            if o["kind"] == kind
            and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        ]
        assert len(matches) == 1, f"expected one {kind} of component {component}: {len(matches)}"
        return matches[0]

    def config(self) -> dict[str, str]:
        cm = self.get("ConfigMap", fullname())
        data: dict[str, str] = cm["data"]
        return data


def name_of(obj: Obj) -> str:
    name: str = obj["metadata"]["name"]
    return name


def fullname() -> str:
    return f"{RELEASE}-waddle"


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def containers(workload: Obj, *, init: bool = False) -> list[Obj]:
    spec = pod_spec(workload)
    found: list[Obj] = list(spec.get("containers", []))
    if init:
        found += spec.get("initContainers", [])
    return found


def env_value(container: Obj, name: str) -> str | None:
    """The literal value of environment variable ``name`` in ``container``, if set."""
    for env in container.get("env", []):
        if env["name"] == name:
            value: str | None = env.get("value")
            return value
    return None


def mounted_secret_files(
    workload: Obj, container: Obj, mount_path: str
) -> dict[str, tuple[str, str]]:
    """File name -> (Secret name, key) for the Secret or projected volume at ``mount_path``."""
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == mount_path]
    assert len(mounts) == 1, f"{container['name']}: nothing (or several) mounted at {mount_path}"
    (volume,) = [v for v in pod_spec(workload).get("volumes", []) if v["name"] == mounts[0]["name"]]
    if "secret" in volume:
        sources = [{"name": volume["secret"]["secretName"], **volume["secret"]}]
    else:
        sources = [s["secret"] for s in volume["projected"]["sources"]]
    files: dict[str, tuple[str, str]] = {}
    for source in sources:
        for item in source["items"]:
            files[item["path"]] = (source["name"], item["key"])
    return files


def secret_files(workload: Obj, container: Obj) -> dict[str, tuple[str, str]]:
    """WADDLE_ variable -> (Secret name, key) that ``container`` reads via WADDLE_SECRETS_DIR."""
    directory = env_value(container, "WADDLE_SECRETS_DIR")
    if directory is None:
        return {}
    return mounted_secret_files(workload, container, directory)


def volume_secrets(workload: Obj) -> list[tuple[str, str | None]]:
    """(Secret name, key or None for all keys) of every Secret the pod mounts."""
    found: list[tuple[str, str | None]] = []
    for volume in pod_spec(workload).get("volumes", []):
        sources = []
        if "secret" in volume:
            sources.append({"name": volume["secret"]["secretName"], **volume["secret"]})
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                sources.append(source["secret"])
        for source in sources:
            items = source.get("items")
            if items:
                found += [(source["name"], item["key"]) for item in items]
            else:
                found.append((source["name"], None))
    return found


def is_hook(obj: Obj) -> bool:
    return "helm.sh/hook" in obj["metadata"].get("annotations", {})


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_values(value_set: str) -> dict[str, Any]:
    path = VALUE_FILES[value_set]
    if path is None:
        return {}
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict), f"{path} is not a mapping"
    return loaded


@functools.cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render_raw(values: Mapping[str, Any], *, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text, exactly as Helm produces it."""
    return _chart().render(copy.deepcopy(dict(values)), name=RELEASE, namespace=namespace)


def render(values: Mapping[str, Any], *, namespace: str = NAMESPACE) -> Rendered:
    raw = render_raw(values, namespace=namespace)
    objects: list[Obj] = []
    hooks: list[Obj] = []
    notes = ""
    for path, text in sorted(raw.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path}: a manifest is not a mapping"
            (hooks if is_hook(doc) else objects).append(doc)
    merged = _chart().merge_values(copy.deepcopy(dict(values)))
    return Rendered(objects, hooks, notes, merged)


@functools.cache
def render_set(value_set: str) -> Rendered:
    return render(load_values(value_set))


def iter_sets() -> Iterator[tuple[str, Rendered]]:
    for value_set in VALUE_FILES:
        yield value_set, render_set(value_set)
