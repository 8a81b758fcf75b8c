# Shared by k8s/up.sh and k8s/down.sh (sourced, not run): settings, the
# cluster flavour (kind by default, K8S=minikube) and the state directory.
# shellcheck shell=bash

K8S=${K8S:-kind}
CLUSTER=${CLUSTER:-waddle}
NAMESPACE=${NAMESPACE:-waddle}
RELEASE=${RELEASE:-waddle}
KUBECTL=${KUBECTL:-kubectl}
HELM=${HELM:-helm}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE_DIR=${STATE_DIR:-$ROOT/var/k8s}

case $K8S in
    kind) CONTEXT=kind-$CLUSTER ;;
    minikube) CONTEXT=$CLUSTER ;;
    *)
        echo "K8S must be kind or minikube, not '$K8S'" >&2
        exit 2
        ;;
esac

# docker when a Docker engine answers (the CLI alone is not enough), else
# podman (kind then runs its nodes on podman too).
if [[ -z ${CONTAINER_TOOL:-} ]]; then
    if docker info >/dev/null 2>&1; then CONTAINER_TOOL=docker; else CONTAINER_TOOL=podman; fi
fi
if [[ $K8S == kind && $CONTAINER_TOOL == podman ]]; then
    export KIND_EXPERIMENTAL_PROVIDER=podman
fi

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
need() {
    local cmd
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' is not installed (needed by make up/down with K8S=$K8S)"
    done
}

kc() { "$KUBECTL" --context "$CONTEXT" --namespace "$NAMESPACE" "$@"; }

cluster_exists() {
    case $K8S in
        kind) kind get clusters 2>/dev/null | grep -qx -- "$CLUSTER" ;;
        minikube) minikube profile list --output json 2>/dev/null | grep -q "\"Name\":\"$CLUSTER\"" ;;
    esac
}

# Stop the port-forwards a previous `make up` started (their pids are ours).
stop_port_forwards() {
    local pidfile pid
    for pidfile in "$STATE_DIR"/port-forward-*.pid; do
        [[ -e $pidfile ]] || continue
        pid=$(<"$pidfile")
        if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}
