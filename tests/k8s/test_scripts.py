"""``make up`` / ``make down`` scripts: syntax, shellcheck, and what they run.

No cluster can run on the test machine, so kind, minikube, kubectl, helm,
docker and curl are replaced by one stub that records its arguments and
answers the few queries the scripts make (a port answers curl once its
port-forward has started, as a real one does). The recorded commands are then
checked: cluster creation only when absent, build, load into the cluster,
``helm upgrade --install`` with the built tag, rollout waits, port-forwards,
and the matching teardown. ``make image`` and the scripts pick docker only
when a Docker engine answers (``docker info``), podman otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.k8s.chart import ROOT

SCRIPTS = [ROOT / "k8s" / name for name in ("up.sh", "down.sh", "lib.sh", "ci-prepare-podman.sh")]
TOOLS = ("kind", "minikube", "kubectl", "helm", "docker", "podman", "curl")
IMAGE_ID = "sha256:0123456789abcdef0123456789abcdef"

STUB = r"""#!/usr/bin/env bash
# Records "<tool> <args>" and answers what k8s/up.sh and k8s/down.sh ask.
tool=$(basename "$0")
printf '%s %s\n' "$tool" "$*" >>"$STUB_LOG"
case "$tool $*" in
    "kind get clusters"*) [[ -e $STUB_STATE/cluster ]] && echo waddle; exit 0 ;;
    "kind create cluster"*) touch "$STUB_STATE/cluster" ;;
    "kind delete cluster"*) rm -f "$STUB_STATE/cluster" ;;
    "minikube profile list"*)
        if [[ -e $STUB_STATE/cluster ]]; then echo '{"valid":[{"Name":"waddle"}]}'
        else echo '{"valid":[]}'; fi ;;
    "minikube status"*) [[ -e $STUB_STATE/cluster ]] || exit 7 ;;
    "minikube start"*) touch "$STUB_STATE/cluster" ;;
    "minikube delete"*) rm -f "$STUB_STATE/cluster" ;;
    "docker image inspect"* | "podman image inspect"*) echo "$STUB_IMAGE_ID" ;;
    "docker info"*)
        [[ -e $STUB_STATE/docker-engine ]] && exit 0
        echo "Cannot connect to the Docker daemon" >&2; exit 1 ;;
    *" get deployment --selector"*) printf 'waddle-edge' ;;
    *" get service/waddle-edge"*) printf '80' ;;
    *" get deployment/waddle-grafana"*) exit 0 ;;
    *" get secret waddle "*) printf '%s' "$(printf 'stub-jwt-secret' | base64)" ;;
    *" port-forward "*)
        # The local port answers from now on (see curl below).
        ports=${!#}; touch "$STUB_STATE/forward-${ports%%:*}"; exec sleep 60 ;;
    "curl "*)
        # Like a real port: refused until its port-forward runs.
        url=${!#}; port=${url#http://127.0.0.1:}; port=${port%%/*}
        [[ -e $STUB_STATE/forward-$port ]] || exit 7 ;;
esac
exit 0
"""


@dataclass
class Sandbox:
    env: dict[str, str]
    log: Path
    state: Path
    var: Path

    def commands(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def run(self, script: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(ROOT / "k8s" / script)],
            env={**self.env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def stop_port_forwards(self) -> None:
        for pidfile in self.var.glob("port-forward-*.pid"):
            pid = int(pidfile.read_text())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "stub"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(stub)
    state = tmp_path / "state"
    state.mkdir()
    log = tmp_path / "commands.log"
    var = tmp_path / "var"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "STUB_LOG": str(log),
        "STUB_STATE": str(state),
        "STUB_IMAGE_ID": IMAGE_ID,
        "STATE_DIR": str(var),
        "CONTAINER_TOOL": "docker",
    }
    box = Sandbox(env, log, state, var)
    try:
        yield box
    finally:
        box.stop_port_forwards()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    checked = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stderr


def test_scripts_are_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); bash -n ran instead")
    checked = subprocess.run(
        ["shellcheck", "-x", *[str(s.relative_to(ROOT)) for s in SCRIPTS]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def index_of(commands: list[str], prefix: str) -> int:
    for i, command in enumerate(commands):
        if command.startswith(prefix):
            return i
    raise AssertionError(f"never ran {prefix!r}; ran:\n" + "\n".join(commands))


def test_up_creates_builds_loads_installs_waits_and_forwards(sandbox: Sandbox) -> None:
    result = sandbox.run("up.sh")
    assert result.returncode == 0, result.stdout + result.stderr
    ran = sandbox.commands()
    tag = IMAGE_ID.removeprefix("sha256:")[:12]
    kubectl = "kubectl --context kind-waddle --namespace waddle"
    order = [
        "kind get clusters",
        "kind create cluster --name waddle",
        "docker build --build-arg BASE_IMAGE=python:3.12-slim -t localhost/waddle:build",
        f"docker tag localhost/waddle:build localhost/waddle:{tag}",
        f"kind load docker-image localhost/waddle:{tag} --name waddle",
        "helm upgrade --install waddle",
        f"{kubectl} rollout status statefulset/waddle-channel",
        f"{kubectl} rollout status deployment/waddle-edge",
        f"{kubectl} port-forward service/waddle-edge 8080:80",
        f"{kubectl} port-forward service/waddle-grafana 3000:3000",
    ]
    positions = [index_of(ran, prefix) for prefix in order]
    assert positions == sorted(positions), "\n".join(ran)
    helm = ran[index_of(ran, "helm upgrade --install")]
    for fragment in (
        f"{ROOT}/k8s/charts/waddle",
        "--kube-context kind-waddle",
        "--namespace waddle --create-namespace",
        f"--values {ROOT}/k8s/values/kind.yaml",
        "--set image.repository=localhost/waddle",
        f"--set image.tag={tag}",
    ):
        assert fragment in helm, helm
    out = result.stdout
    assert "http://127.0.0.1:8080/" in out and "http://127.0.0.1:3000/" in out
    assert "jwt-secret" in out, "no way to get a token was printed"
    assert (sandbox.var / "created-kind-waddle").exists()
    assert len(list(sandbox.var.glob("port-forward-*.pid"))) == 2

    # A second run reuses the cluster and replaces its own port-forwards.
    sandbox.log.unlink()
    again = sandbox.run("up.sh")
    assert again.returncode == 0, again.stderr
    assert not any(c.startswith("kind create cluster") for c in sandbox.commands())


def test_down_deletes_the_cluster_up_created(sandbox: Sandbox) -> None:
    assert sandbox.run("up.sh").returncode == 0
    sandbox.log.unlink()
    result = sandbox.run("down.sh")
    assert result.returncode == 0, result.stderr
    assert "kind delete cluster --name waddle" in sandbox.commands()
    assert not list(sandbox.var.glob("port-forward-*.pid"))
    assert not (sandbox.var / "created-kind-waddle").exists()


def test_down_leaves_a_cluster_it_did_not_create(sandbox: Sandbox) -> None:
    (sandbox.state / "cluster").touch()
    result = sandbox.run("down.sh")
    assert result.returncode == 0, result.stderr
    ran = sandbox.commands()
    assert not any(c.startswith("kind delete") for c in ran)
    index_of(ran, "helm uninstall waddle --kube-context kind-waddle --namespace waddle")
    index_of(ran, "kubectl --context kind-waddle delete namespace waddle")


def test_minikube_flavour(sandbox: Sandbox) -> None:
    result = sandbox.run("up.sh", K8S="minikube")
    assert result.returncode == 0, result.stdout + result.stderr
    ran = sandbox.commands()
    index_of(ran, "minikube start --profile waddle")
    index_of(ran, "minikube image load localhost/waddle:")
    assert "--kube-context waddle" in ran[index_of(ran, "helm upgrade --install")]
    sandbox.log.unlink()
    assert sandbox.run("down.sh", K8S="minikube").returncode == 0
    index_of(sandbox.commands(), "minikube delete --profile waddle")


def test_podman_builds_are_loaded_as_archives(sandbox: Sandbox) -> None:
    result = sandbox.run("up.sh", CONTAINER_TOOL="podman")
    assert result.returncode == 0, result.stdout + result.stderr
    ran = sandbox.commands()
    save = index_of(ran, "podman save --format docker-archive -o")
    load = index_of(ran, "kind load image-archive")
    assert save < load


def test_unknown_flavour_is_refused(sandbox: Sandbox) -> None:
    result = sandbox.run("up.sh", K8S="k3d")
    assert result.returncode == 2
    assert "K8S must be kind or minikube" in result.stderr
    assert sandbox.commands() == []


def make_image(sandbox: Sandbox) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in sandbox.env.items() if k != "CONTAINER_TOOL"}
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "image"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_image_falls_back_to_podman_when_no_docker_engine_answers(sandbox: Sandbox) -> None:
    # The docker CLI exists (the stub) but its engine does not answer.
    result = make_image(sandbox)
    assert result.returncode == 0, result.stdout + result.stderr
    ran = sandbox.commands()
    assert "building with podman" in result.stdout
    build = index_of(ran, "podman build --format docker")
    assert index_of(ran, "docker info") < build
    assert not any(c.startswith("docker build") for c in ran)

    (sandbox.state / "docker-engine").touch()
    sandbox.log.unlink()
    result = make_image(sandbox)
    assert result.returncode == 0, result.stdout + result.stderr
    index_of(sandbox.commands(), "docker build --build-arg BASE_IMAGE=")


def test_scripts_fall_back_to_podman_when_no_docker_engine_answers(sandbox: Sandbox) -> None:
    env = {k: v for k, v in sandbox.env.items() if k != "CONTAINER_TOOL"}
    result = subprocess.run(
        ["bash", str(ROOT / "k8s" / "up.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ran = sandbox.commands()
    index_of(ran, "podman build --build-arg BASE_IMAGE=")
    assert not any(c.startswith("docker build") for c in ran)
