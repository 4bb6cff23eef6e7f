#!/usr/bin/env bash
# Build the offline AWS emulator image (moto server) used by the
# sightline-tests crate (tests/src/emulator.rs). Idempotent and offline with
# respect to container registries: nothing is ever pulled.
#
#   1. base image  sightline/emulator-base:bookworm
#        debootstrap --variant=minbase --include=python3,python3-venv bookworm
#        -> tarball cached in $CACHE -> `docker import`
#   2. wheels      pip download -r tests/emulator/requirements.txt on the host
#        (CPython 3.11 / manylinux x86_64, binary only), cached in $CACHE
#   3. image       docker build --network=host tests/emulator/Dockerfile
#        tagged sightline/moto-emulator:5 (SIGHTLINE_EMULATOR_BUILD_TAG),
#        labelled with a hash of the context's sources (Dockerfile,
#        requirements.txt, serve.py, the DynamoDB and S3 Vectors patches and their tests) and
#        this script; skipped when a tag with the same hash already exists.
#
# Prints the image tag on stdout (last line); progress goes to stderr.
# Env: SIGHTLINE_EMULATOR_CACHE (default: <cargo target dir>/emulator-cache),
#      DEBIAN_MIRROR (default: first URI of the host's apt sources, else
#      http://deb.debian.org/debian), FORCE_REBUILD=1 to rebuild the image.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CTX_SRC="$ROOT/tests/emulator"
IMAGE=${SIGHTLINE_EMULATOR_BUILD_TAG:-sightline/moto-emulator:5}
BASE_IMAGE=sightline/emulator-base:bookworm
SUITE=bookworm
CACHE=${SIGHTLINE_EMULATOR_CACHE:-${CARGO_TARGET_DIR:-$ROOT/target}/emulator-cache}

say() { echo "build-emulator-image: $*" >&2; }
die() { echo "build-emulator-image: ERROR: $*" >&2; exit 1; }

[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported (wheels are pinned to manylinux x86_64)"
docker info >/dev/null 2>&1 || die "Docker is not available. Run scripts/docker-up.sh first."

# The legacy builder works with any daemon and needs no buildx plugin (newer
# docker clients otherwise require buildx for `docker build`).
export DOCKER_BUILDKIT=0

# Every file the image is built from (the build context's sources, this script): a change to
# any of them, e.g. one of the moto patches, must rebuild the image.
CTX_FILES=(Dockerfile requirements.txt serve.py dynamodb_serial.py test_dynamodb_serial.py
           s3vectors_query.py test_s3vectors_query.py)
HASH=$(cat "${CTX_FILES[@]/#/$CTX_SRC/}" "$0" | sha256sum | cut -c1-16)

if [ "${FORCE_REBUILD:-0}" != 1 ] &&
   [ "$(docker image inspect -f '{{ index .Config.Labels "sightline.emulator.hash" }}' "$IMAGE" 2>/dev/null || true)" = "$HASH" ]; then
    say "$IMAGE is up to date (hash $HASH)"
    echo "$IMAGE"
    exit 0
fi

mkdir -p "$CACHE"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# ---------------------------------------------------------------- base image
ROOTFS_TAR="$CACHE/rootfs-$SUITE-minbase-python3.tar"
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if [ ! -s "$ROOTFS_TAR" ]; then
        if ! command -v debootstrap >/dev/null 2>&1; then
            say "installing debootstrap"
            export DEBIAN_FRONTEND=noninteractive
            $SUDO apt-get update -qq
            $SUDO apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
        fi
        MIRROR=${DEBIAN_MIRROR:-}
        if [ -z "$MIRROR" ]; then
            MIRROR=$( (grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security || true;
                       grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security) | head -n1 || true)
            MIRROR=${MIRROR:-http://deb.debian.org/debian}
        fi
        ROOTFS=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        trap '$SUDO rm -rf "$ROOTFS"' EXIT
        say "debootstrap $SUITE (minbase + python3) from $MIRROR (log: $CACHE/debootstrap.log)"
        if ! $SUDO debootstrap --variant=minbase --include=python3,python3-venv \
                "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
            tail -n 30 "$CACHE/debootstrap.log" >&2
            die "debootstrap failed"
        fi
        # Trim: apt lists/caches, docs, man pages.
        $SUDO rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
                     "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
        $SUDO tar --numeric-owner -C "$ROOTFS" -cf "$ROOTFS_TAR.tmp" .
        mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
        $SUDO rm -rf "$ROOTFS"
        trap - EXIT
    else
        say "using cached rootfs $ROOTFS_TAR"
    fi
    say "docker import -> $BASE_IMAGE"
    docker import -c 'CMD ["/bin/bash"]' "$ROOTFS_TAR" "$BASE_IMAGE" >/dev/null
fi

# -------------------------------------------------------------------- wheels
REQ_HASH=$(sha256sum "$CTX_SRC/requirements.txt" | cut -c1-16)
WHEELS="$CACHE/wheels-$REQ_HASH"
if [ ! -f "$WHEELS/.complete" ]; then
    PIP=(python3 -m pip)
    if ! "${PIP[@]}" --version >/dev/null 2>&1; then
        say "installing python3-pip on the host"
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    fi
    say "pip download -> $WHEELS"
    rm -rf "$WHEELS"
    mkdir -p "$WHEELS"
    "${PIP[@]}" download --disable-pip-version-check -q -d "$WHEELS" \
        -r "$CTX_SRC/requirements.txt" \
        --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_34_x86_64 \
        || die "pip download failed"
    touch "$WHEELS/.complete"
else
    say "using cached wheels $WHEELS"
fi

# --------------------------------------------------------------------- image
CTX="$CACHE/context"
rm -rf "$CTX"
mkdir -p "$CTX/wheels"
(cd "$CTX_SRC" && cp "${CTX_FILES[@]}" "$CTX/")
cp "$WHEELS"/*.whl "$CTX/wheels/"

say "docker build -> $IMAGE"
docker build --network=host --force-rm \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --label "sightline.emulator.hash=$HASH" \
    -t "$IMAGE" "$CTX" >"$CACHE/docker-build.log" 2>&1 \
    || { tail -n 40 "$CACHE/docker-build.log" >&2; die "docker build failed (full log: $CACHE/docker-build.log)"; }
grep -E '^moto [0-9]' "$CACHE/docker-build.log" >&2 || true
rm -rf "$CTX"
# Drop the untagged build stage and images left dangling by earlier builds of
# this tag (only images carrying our labels are touched).
docker image prune -f --filter "label=sightline.emulator.stage=build" >/dev/null 2>&1 || true
docker image prune -f --filter "label=sightline.emulator.hash" >/dev/null 2>&1 || true

say "built $IMAGE (hash $HASH)"
echo "$IMAGE"
