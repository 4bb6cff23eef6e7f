#!/usr/bin/env bash
# Make a Docker engine available on this machine (idempotent).
#
# - If `docker info` already works: exit 0.
# - Otherwise install docker.io (Debian) if dockerd is missing, start dockerd
#   in the background WITHOUT a bridge network or iptables rules (this machine
#   has no docker bridge; containers use host networking bound to 127.0.0.1),
#   and wait up to 60 s for it to answer.
# - If no engine can be had: print a clear error and exit 1. Integration tests
#   must never be silently skipped.
set -euo pipefail

LOG=${DOCKERD_LOG:-/tmp/dockerd.log}
WAIT_SECS=${DOCKERD_WAIT_SECS:-60}

say() { echo "docker-up: $*" >&2; }
die() { echo "docker-up: ERROR: $*" >&2; exit 1; }

docker_ok() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

if docker_ok; then
    say "docker engine already running"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "not root and no sudo: cannot install/start dockerd"
    SUDO="sudo"
fi

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "dockerd missing and apt-get not available; install Docker manually"
    say "installing docker.io via apt-get"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq || die "apt-get update failed"
    $SUDO apt-get install -y -qq --no-install-recommends docker.io >/dev/null \
        || die "apt-get install docker.io failed"
fi

# The docker.io package ships its own client in /usr/bin; an older/newer one
# may sit earlier in PATH (/usr/local/bin). Prefer the packaged one if the
# first one cannot talk to the daemon later.
DOCKERD=$(command -v dockerd) || die "dockerd still not found after install"

if [ -S /var/run/docker.sock ] && ! pgrep -x dockerd >/dev/null 2>&1; then
    say "removing stale /var/run/docker.sock"
    $SUDO rm -f /var/run/docker.sock
fi

if ! pgrep -x dockerd >/dev/null 2>&1; then
    # containerd: docker.io on bookworm depends on containerd; dockerd starts
    # its own managed containerd when none is running at the default socket.
    say "starting $DOCKERD (log: $LOG)"
    # setsid: own session, so it outlives the calling shell/job.
    $SUDO setsid nohup "$DOCKERD" --bridge=none --iptables=false --ip6tables=false \
        >>"$LOG" 2>&1 </dev/null &
    disown || true
else
    say "dockerd process already present; waiting for it to answer"
fi

for _ in $(seq 1 "$WAIT_SECS"); do
    if docker_ok; then
        say "docker engine is up"
        exit 0
    fi
    # The client in PATH may be too new/old for the packaged daemon; fall back
    # to the packaged client for the health check.
    if [ -x /usr/bin/docker ] && /usr/bin/docker info >/dev/null 2>&1; then
        say "docker engine is up (note: use /usr/bin/docker; $(command -v docker) cannot talk to it)"
        exit 0
    fi
    sleep 1
done

echo "----- last lines of $LOG -----" >&2
tail -n 30 "$LOG" >&2 || true
die "dockerd did not answer within ${WAIT_SECS}s. Integration tests need Docker: fix the above and re-run scripts/docker-up.sh"
