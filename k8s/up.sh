#!/usr/bin/env bash
# make up: a local Kubernetes with Waddle in it.
#
# Creates the cluster if absent (kind by default, K8S=minikube), builds the
# image, loads it into the cluster, installs the chart with
# k8s/values/kind.yaml (bundled Prometheus and Grafana), waits for the
# rollout, port-forwards the edge and Grafana, and prints the URLs and a token.
#
# Environment: K8S (kind|minikube), CLUSTER, NAMESPACE, RELEASE, VALUES (extra
# values file), CONTAINER_TOOL (docker|podman), BASE_IMAGE, EDGE_PORT,
# GRAFANA_PORT, TIMEOUT (rollout wait, e.g. 10m).
set -euo pipefail
# shellcheck source=k8s/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

IMAGE_REPO=${IMAGE_REPO:-localhost/waddle}
BASE_IMAGE=${BASE_IMAGE:-python:3.12-slim}
EDGE_PORT=${EDGE_PORT:-8080}
GRAFANA_PORT=${GRAFANA_PORT:-3000}
TIMEOUT=${TIMEOUT:-10m}

need "$K8S" "$KUBECTL" "$HELM" "$CONTAINER_TOOL" curl
mkdir -p "$STATE_DIR"

# --- cluster ------------------------------------------------------------------
if cluster_exists; then
    log "using existing $K8S cluster '$CLUSTER'"
    if [[ $K8S == minikube ]] && ! minikube status --profile "$CLUSTER" >/dev/null 2>&1; then
        minikube start --profile "$CLUSTER"
    fi
else
    log "creating $K8S cluster '$CLUSTER'"
    case $K8S in
        kind)
            kind create cluster --name "$CLUSTER" --wait 180s
            ;;
        minikube)
            # Calico enforces the chart's NetworkPolicies (the default CNI ignores them).
            minikube start --profile "$CLUSTER" --cni calico --memory 4096 --cpus 2
            ;;
    esac
    # down.sh deletes only clusters that up.sh created.
    touch "$STATE_DIR/created-$K8S-$CLUSTER"
fi

# --- image ----------------------------------------------------------------------
log "building $IMAGE_REPO with $CONTAINER_TOOL (base $BASE_IMAGE)"
"$CONTAINER_TOOL" build --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE_REPO:build" "$ROOT"
# Tag with the image's own ID so that every rebuild rolls the pods.
image_id=$("$CONTAINER_TOOL" image inspect --format '{{.Id}}' "$IMAGE_REPO:build")
image_id=${image_id#sha256:}
TAG=${image_id:0:12}
IMAGE=$IMAGE_REPO:$TAG
"$CONTAINER_TOOL" tag "$IMAGE_REPO:build" "$IMAGE"

log "loading $IMAGE into the cluster"
archive=""
cleanup_archive() { [[ -z $archive ]] || rm -f "$archive"; }
trap cleanup_archive EXIT
if [[ $CONTAINER_TOOL == docker ]]; then
    case $K8S in
        kind) kind load docker-image "$IMAGE" --name "$CLUSTER" ;;
        minikube) minikube image load "$IMAGE" --profile "$CLUSTER" ;;
    esac
else
    archive=$(mktemp "${TMPDIR:-/tmp}/waddle-image.XXXXXX.tar")
    "$CONTAINER_TOOL" save --format docker-archive -o "$archive" "$IMAGE"
    case $K8S in
        kind) kind load image-archive "$archive" --name "$CLUSTER" ;;
        minikube) minikube image load "$archive" --profile "$CLUSTER" ;;
    esac
fi

# --- chart ----------------------------------------------------------------------
values_args=(--values "$ROOT/k8s/values/kind.yaml")
if [[ -n ${VALUES:-} ]]; then values_args+=(--values "$VALUES"); fi
log "helm upgrade --install $RELEASE (namespace $NAMESPACE)"
"$HELM" upgrade --install "$RELEASE" "$ROOT/k8s/charts/waddle" \
    --kube-context "$CONTEXT" --namespace "$NAMESPACE" --create-namespace \
    "${values_args[@]}" \
    --set "image.repository=$IMAGE_REPO" --set "image.tag=$TAG" \
    --timeout "$TIMEOUT"

FULLNAME=$(kc get deployment --selector "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=edge" \
    --output jsonpath='{.items[0].metadata.name}')
FULLNAME=${FULLNAME%-edge}

log "waiting for the rollout"
kc rollout status "statefulset/$FULLNAME-channel" --timeout "$TIMEOUT"
kc rollout status "deployment/$FULLNAME-store" --timeout "$TIMEOUT"
kc rollout status "deployment/$FULLNAME-edge" --timeout "$TIMEOUT"
monitoring=false
if kc get "deployment/$FULLNAME-grafana" >/dev/null 2>&1; then
    monitoring=true
    kc rollout status "deployment/$FULLNAME-prometheus" --timeout "$TIMEOUT"
    kc rollout status "deployment/$FULLNAME-grafana" --timeout "$TIMEOUT"
fi

# --- port-forwards --------------------------------------------------------------
stop_port_forwards
forward() { # name service local-port service-port
    nohup "$KUBECTL" --context "$CONTEXT" --namespace "$NAMESPACE" port-forward \
        "service/$2" "$3:$4" >"$STATE_DIR/port-forward-$1.log" 2>&1 &
    echo $! >"$STATE_DIR/port-forward-$1.pid"
}
wait_http() { # url: up to 30 s
    local _
    for _ in $(seq 60); do
        curl --silent --fail --max-time 2 --output /dev/null "$1" && return 0
        sleep 0.5
    done
    die "$1 did not answer; see $STATE_DIR/port-forward-*.log"
}
edge_service_port=$(kc get "service/$FULLNAME-edge" --output jsonpath='{.spec.ports[0].port}')
forward edge "$FULLNAME-edge" "$EDGE_PORT" "$edge_service_port"
wait_http "http://127.0.0.1:$EDGE_PORT/healthz"
if $monitoring; then
    forward grafana "$FULLNAME-grafana" "$GRAFANA_PORT" 3000
    wait_http "http://127.0.0.1:$GRAFANA_PORT/api/health"
fi

# --- how to use it ----------------------------------------------------------------
secret=$(kc get secret "$FULLNAME" --output jsonpath='{.data.jwt-secret}' 2>/dev/null | base64 --decode || true)
python=python3
if [[ -x $ROOT/.venv/bin/python ]]; then python=$ROOT/.venv/bin/python; fi
token=$("$python" -c '
import sys, time
import jwt
claims = {"sub": "u1", "username": "alice", "permissions": ["read", "write"],
          "exp": int(time.time()) + 24 * 3600}
print(jwt.encode(claims, sys.argv[1], algorithm="HS256"))
' "$secret" 2>/dev/null || true)
[[ -n $secret ]] || token=""

cat <<MSG

Waddle is up on $K8S cluster '$CLUSTER' (context $CONTEXT, namespace $NAMESPACE, image $IMAGE).

  Chat page   http://127.0.0.1:$EDGE_PORT/
  WebSocket   ws://127.0.0.1:$EDGE_PORT/channel/<channel-id>/websocket
MSG
if $monitoring; then
    cat <<MSG
  Grafana     http://127.0.0.1:$GRAFANA_PORT/   (dashboard "Waddle realtime"; admin password:
              $KUBECTL --context $CONTEXT -n $NAMESPACE get secret $FULLNAME-grafana -o jsonpath='{.data.admin-password}' | base64 -d)
MSG
fi
if [[ -n $token ]]; then
    printf '\n  A token for user u1 "alice" (read, write), valid 24 h:\n  %s\n' "$token"
fi
cat <<MSG

  More tokens: sign HS256 claims {sub, username, permissions, exp} with the key from
    $KUBECTL --context $CONTEXT -n $NAMESPACE get secret $FULLNAME -o jsonpath='{.data.jwt-secret}' | base64 -d
  (helm status $RELEASE -n $NAMESPACE --kube-context $CONTEXT prints a one-line command.)

  Port-forwards run in the background (logs in $STATE_DIR); \`make down\` removes everything.
MSG
