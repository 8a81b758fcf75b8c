#!/usr/bin/env bash
# Prepare a machine without a Docker engine for the image test
# (tests/k8s/test_image.py): install podman, buildah, runc and debootstrap
# from Debian, then build a local base image, because no container registry
# may be reachable.
#
# Idempotent: packages already installed and an image already present are
# left alone. Needs root (or passwordless sudo) and apt. On machines without
# apt it prints why it did nothing and exits 0; the image test then skips
# with its own reason.
#
# Environment:
#   BASE_IMAGE  name of the local base image (default localhost/debian-base:bookworm)
#   SUITE       Debian suite to debootstrap (default bookworm; it ships python3.11)
#   MIRROR      Debian mirror (default: the first one in the host's apt sources)
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-localhost/debian-base:bookworm}
SUITE=${SUITE:-bookworm}
PACKAGES=(podman buildah runc debootstrap)

log() { printf 'ci-prepare-podman: %s\n' "$*" >&2; }

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    log "not root and no passwordless sudo: skipping (the image test will skip)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    log "apt-get not found: skipping (the image test will skip)"
    exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "packages present: ${PACKAGES[*]}"
fi

if "${SUDO[@]}" podman image exists "$BASE_IMAGE" 2>/dev/null; then
    log "base image present: $BASE_IMAGE"
    exit 0
fi

if [[ -z ${MIRROR:-} ]]; then
    # Reuse the mirror the host already reaches; fall back to the official one.
    MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -E '^(deb|URIs:)[[:space:]]' | grep -oE 'https?://[^[:space:]]+' \
        | grep -E '/debian/?$' | head -n1 || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

workdir=$(mktemp -d)
cleanup() { "${SUDO[@]}" rm -rf "$workdir"; }
trap cleanup EXIT

log "debootstrap --variant=minbase $SUITE from $MIRROR"
"${SUDO[@]}" debootstrap --variant=minbase "$SUITE" "$workdir/rootfs" "$MIRROR" >/dev/null
# The image build runs apt-get inside this root: give it the same mirror.
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" | "${SUDO[@]}" tee "$workdir/rootfs/etc/apt/sources.list" >/dev/null
"${SUDO[@]}" rm -rf "$workdir/rootfs/var/cache/apt/archives/"*.deb "$workdir/rootfs/var/lib/apt/lists/"*

log "importing $BASE_IMAGE"
"${SUDO[@]}" tar -C "$workdir/rootfs" -c . | "${SUDO[@]}" podman import - "$BASE_IMAGE" >/dev/null
log "done: $BASE_IMAGE"
