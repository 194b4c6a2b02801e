#!/usr/bin/env bash
# Make a Docker engine available: install the Debian package when the client is
# missing and start `dockerd` when no engine answers. Idempotent; safe to source
# or run. Needs root on machines where the engine is not already running.
set -euo pipefail

log() { printf 'ensure-docker: %s\n' "$*" >&2; }

if ! command -v docker >/dev/null 2>&1 || ! command -v dockerd >/dev/null 2>&1; then
  log "installing docker.io"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q docker.io >/dev/null
fi

if docker info >/dev/null 2>&1; then
  exit 0
fi

log "no Docker engine answers; starting dockerd"
log_file=${DOCKERD_LOG:-/var/log/cellmon-dockerd.log}
nohup dockerd >"$log_file" 2>&1 </dev/null &
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    log "dockerd is up"
    exit 0
  fi
  sleep 1
done
log "dockerd did not come up within 60 s; see $log_file"
tail -n 20 "$log_file" >&2 || true
exit 1
