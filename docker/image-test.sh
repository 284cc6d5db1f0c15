#!/usr/bin/env bash
# Build the CPU image and really run it, on a machine without a Docker engine or registry access.
#
#   1. make a Debian bookworm base image locally (debootstrap + `podman import`): docker.io is not
#      reachable here, only the Debian and PyPI package registries are;
#   2. `podman build --isolation chroot` docker/Dockerfile on top of it (no daemon, no user namespaces);
#   3. export the image's filesystem and start its ENTRYPOINT with chroot, as the image's user, with the
#      image's environment and a read-only root (what the Kubernetes manifests ask for);
#   4. hit /health, the image's own HEALTHCHECK command, /generate and /metrics.
#
# Needs root (debootstrap, chroot, mount). Slow the first time (base + torch + model conversion: minutes);
# the base image is reused. Not part of `make test`: run it with `make image-test`.
# Settings: IMAGE_TEST_DIR (work dir, default .image/), DEBIAN_MIRROR, TORCH_WHEEL (a local CPU torch
# 2.13.0 cp311 wheel), KEEP_ROOTFS=1 to keep the exported filesystem.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${IMAGE_TEST_DIR:-$ROOT/.image}
BASE=localhost/refiner-base:bookworm
IMAGE=localhost/refiner:cpu
ROOTFS=$WORK/rootfs
SERVER_PID=
log() { printf '\n==> %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "image-test needs root (debootstrap, chroot, mount)" >&2; exit 1; }
need=()
command -v podman >/dev/null || need+=(podman)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
mkdir -p "$WORK"

# ---- 1. base image -------------------------------------------------------------------------------
# Use the mirror apt already uses on this machine (it is the one known to be reachable).
mirror() {
    { grep -rhE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null || true; } \
        | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true
}
if ! podman image exists "$BASE"; then
    MIRROR=${DEBIAN_MIRROR:-$(mirror)}
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    log "debootstrap bookworm from $MIRROR"
    rm -rf --one-file-system "$WORK/base"  # never into a mount debootstrap may have left
    # python3 of bookworm is 3.11, the version of the CPU torch wheel; passwd gives useradd.
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
        bookworm "$WORK/base" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/debootstrap.log"; exit 1; }
    rm -rf "$WORK"/base/var/lib/apt/lists/* "$WORK"/base/var/cache/apt/archives/*.deb
    # Trust what this machine trusts: it may reach PyPI through a TLS-inspecting proxy whose CA is only
    # in the host's bundle. pip uses its own bundle unless PIP_CERT says otherwise.
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/base/etc/ssl/certs/ca-certificates.crt"
    tar -C "$WORK/base" -c . | podman import --change 'CMD ["python3"]' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' - "$BASE"
    rm -rf --one-file-system "$WORK/base"  # never into a mount debootstrap may have left
fi

# ---- 2. build --------------------------------------------------------------------------------------
# PyPI's torch is a multi-GB CUDA build: hand the build the CPU wheel through docker/wheels/.
WHEEL=${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -n1 || true)}
if [ -n "$WHEEL" ]; then
    cp -u "$WHEEL" "$ROOT/docker/wheels/"
else
    echo "warning: no CPU torch wheel found (set TORCH_WHEEL); the build takes torch from TORCH_INDEX_URL" >&2
fi
log "podman build $IMAGE"
start=$(date +%s)
# --format docker keeps HEALTHCHECK (the OCI format has no field for it).
podman build --isolation chroot --format docker \
    --build-arg BASE_IMAGE="$BASE" ${WHEEL:+--build-arg TORCH_INDEX_URL=} \
    -f "$ROOT/docker/Dockerfile" -t "$IMAGE" "$ROOT"
podman image exists "$IMAGE" || { echo "build did not produce $IMAGE" >&2; exit 1; }
echo "built in $(($(date +%s) - start)) s"
podman image ls "$IMAGE"

# ---- 3. run the exported filesystem ----------------------------------------------------------------
# Removing the exported tree is only safe once nothing is mounted inside it: never let rm reach a mount
# (--one-file-system), and keep the tree if an unmount failed.
remove_rootfs() {
    if findmnt -rn -o TARGET | grep -q "^$ROOTFS"; then
        echo "still mounted under $ROOTFS; not removing it" >&2
        return 1
    fi
    rm -rf --one-file-system "$ROOTFS"
}
cleanup() {
    set +e  # clean up as much as possible, whatever fails
    if [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; then wait "$SERVER_PID"; fi
    for m in tmp dev proc ""; do
        if mountpoint -q "$ROOTFS/$m"; then umount "$ROOTFS/$m" 2>/dev/null || umount -l "$ROOTFS/$m"; fi
    done
    if [ "${KEEP_ROOTFS:-0}" != 1 ]; then remove_rootfs; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # so that an interrupted run still cleans up

log "exporting the image filesystem to $ROOTFS"
if [ -e "$ROOTFS" ]; then remove_rootfs; fi
mkdir -p "$ROOTFS"
cid=$(podman create --pull=never --no-healthcheck "$IMAGE")
podman export "$cid" | tar -C "$ROOTFS" -x
podman rm "$cid" >/dev/null

# The image's own config (env, user, entrypoint, healthcheck), one list item a line.
config() {
    podman image inspect "$IMAGE" | python3 -c 'import json, sys
value = json.load(sys.stdin)[0]
for key in sys.argv[1].split("."):
    value = (value or {}).get(key)
print(*(value if isinstance(value, list) else [value or ""]), sep="\n")' "$1"
}
mapfile -t ENVS < <(config Config.Env)
USERSPEC=$(config Config.User)
mapfile -t ENTRY < <(config Config.Entrypoint)
mapfile -t HEALTH < <(config Healthcheck.Test)  # kept by --format docker
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# A read-only root with a writable /tmp, as in deploy/base/deployment.yaml (readOnlyRootFilesystem).
mount --bind "$ROOTFS" "$ROOTFS" && mount -o remount,bind,ro "$ROOTFS"
mount -t proc proc "$ROOTFS/proc"
# A private /dev with only the harmless nodes (as container runtimes do), not the host's /dev.
mount -t tmpfs -o mode=755,nosuid tmpfs "$ROOTFS/dev"
for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9; do
    IFS=: read -r name major minor <<<"$node"
    mknod -m 666 "$ROOTFS/dev/$name" c "$major" "$minor"
done
ln -s /proc/self/fd "$ROOTFS/dev/fd"
mount -t tmpfs -o mode=1777 tmpfs "$ROOTFS/tmp"

# chroot and env exec, so a command started with this prefix keeps its pid (SERVER_PID is the server's).
IN_IMAGE=(chroot --userspec="$USERSPEC" "$ROOTFS" env -i "${ENVS[@]}" REFINER_PORT="$PORT")

log "starting: chroot --userspec=$USERSPEC ${ENTRY[*]} --host 127.0.0.1 --port $PORT"
"${IN_IMAGE[@]}" "${ENTRY[@]}" --host 127.0.0.1 --port "$PORT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
URL=http://127.0.0.1:$PORT
start=$(date +%s)
until curl -fsS "$URL/health" >/dev/null 2>&1; do
    # /health answers 503 "loading" while the model loads and 503 "failed" if loading failed.
    if ! kill -0 "$SERVER_PID" 2>/dev/null || curl -sS "$URL/health" 2>/dev/null | grep -q '"failed"'; then
        echo "server exited or failed to load:"; cat "$WORK/server.log"; exit 1
    fi
    if [ $(($(date +%s) - start)) -gt 300 ]; then
        echo "no /health after 300 s:"; cat "$WORK/server.log"; exit 1
    fi
    sleep 1
done
echo "healthy after $(($(date +%s) - start)) s"

# ---- 4. requests ----------------------------------------------------------------------------------
log "GET /health"
curl -fsS "$URL/health"; echo
if [ ${#HEALTH[@]} -gt 1 ]; then
    log "image HEALTHCHECK: ${HEALTH[*]:1}"
    "${IN_IMAGE[@]}" "${HEALTH[@]:1}" || { echo "HEALTHCHECK failed" >&2; exit 1; }
    echo "healthcheck ok"
fi
log "POST /generate"
curl -fsS "$URL/generate" -H 'Content-Type: application/json' \
    -d '{"inputs": "The three primary colours are", "parameters": {"max_new_tokens": 12}}'
echo
log "GET /metrics (refiner_ series)"
curl -fsS "$URL/metrics" | grep '^refiner_' | grep -v '_bucket{' | head -n 40
log "server log (tail)"
tail -n 15 "$WORK/server.log"
log "image-test passed"
