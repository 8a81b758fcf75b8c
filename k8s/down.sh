#!/usr/bin/env bash
# make down: undo `make up`. Stops its port-forwards; deletes the cluster if
# `make up` created it, otherwise uninstalls the release and its namespace.
set -euo pipefail
# shellcheck source=k8s/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

stop_port_forwards
marker=$STATE_DIR/created-$K8S-$CLUSTER

if [[ -e $marker ]]; then
    need "$K8S"
    log "deleting $K8S cluster '$CLUSTER'"
    case $K8S in
        kind) kind delete cluster --name "$CLUSTER" ;;
        minikube) minikube delete --profile "$CLUSTER" ;;
    esac
    rm -f "$marker"
elif cluster_exists; then
    need "$KUBECTL" "$HELM"
    log "uninstalling release '$RELEASE' from the existing cluster '$CLUSTER'"
    "$HELM" uninstall "$RELEASE" --kube-context "$CONTEXT" --namespace "$NAMESPACE" --ignore-not-found
    # The PostgreSQL volume claim outlives the release on purpose; drop it with the namespace.
    "$KUBECTL" --context "$CONTEXT" delete namespace "$NAMESPACE" --ignore-not-found --wait=true
else
    log "no $K8S cluster '$CLUSTER': nothing to remove"
fi
