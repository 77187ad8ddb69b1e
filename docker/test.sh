#!/usr/bin/env bash
# `make docker-test`: build the image and drive it for real through the mounted socket.
# Needs a Docker engine (Debian's docker.io). With no image registry reachable, the base image
# is made locally: debootstrap of Debian bookworm (its python3 is 3.11) imported under the
# FROM name. Everything it creates is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=python:3.11-slim-bookworm
IMAGE=kmsd:test
RUN_ID=kmstest$$

if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || { apt-get update -qq && apt-get install -y -qq docker.io; }
    (dockerd >/tmp/kms-dockerd.log 2>&1 &)
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi

if ! docker image inspect "$BASE" >/dev/null 2>&1 && ! docker pull -q "$BASE" >/dev/null 2>&1; then
    echo "no registry: building $BASE locally with debootstrap"
    command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
    tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
    rm -rf "$rootfs"
fi

# Fetch the wheels on the host (which can reach PyPI), so the build needs no network.
rm -f docker/wheels/*.whl
pip_host=(.venv/bin/python -m pip)
[ -x .venv/bin/python ] || pip_host=(python3 -m pip)
"${pip_host[@]}" download -q -d docker/wheels pip==24.2 setuptools wheel . 2>/dev/null
rm -f docker/wheels/kms-*.tar.gz docker/wheels/kms-*.zip
docker build -q -t "$IMAGE" . >/dev/null
workdir=$(mktemp -d)
cleanup() {
    rm -f docker/wheels/*.whl docker/wheels/*.tar.gz
    docker rm -f "$RUN_ID" >/dev/null 2>&1 || true
    docker volume rm "$RUN_ID-store" "$RUN_ID-socket" >/dev/null 2>&1 || true
    rm -rf "$workdir"
}
trap cleanup EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$workdir/kek"
chmod 0644 "$workdir/kek"   # readable by the container's kms user (uid 990)
docker volume create "$RUN_ID-store" >/dev/null
docker volume create "$RUN_ID-socket" >/dev/null
docker run -d --name "$RUN_ID" --network none \
    -v "$RUN_ID-store:/var/lib/kms" -v "$RUN_ID-socket:/run/kms" \
    -v "$workdir/kek:/run/secrets/kek:ro" "$IMAGE" >/dev/null
client() {
    docker run --rm --network none -v "$RUN_ID-socket:/run/kms" --entrypoint kms "$IMAGE" "$@"
}
for _ in $(seq 60); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$RUN_ID")
    [ "$status" = healthy ] && break
    sleep 1
done
echo "health: $status"
echo "kms ping: $(client ping)"
echo "kms create demo --exportable: $(client create demo --exportable)"
key=$(client get demo --format hex)
echo "kms get demo --format hex: ${#key} hex characters"
[ "$status" = healthy ] && [ ${#key} -eq 64 ]
echo "docker-test passed"
