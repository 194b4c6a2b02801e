#!/usr/bin/env bash
# Make a headless browser available for the report test (it opens the load
# report's HTML page in Chromium): installs Debian's `chromium` package when
# no Chromium is on PATH. Idempotent. Needs root when it has to install.
set -euo pipefail

log() { printf 'ensure-chromium: %s\n' "$*" >&2; }

for browser in chromium chromium-browser google-chrome; do
  if command -v "$browser" >/dev/null 2>&1; then
    exit 0
  fi
done
log "installing chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q chromium >/dev/null
command -v chromium >/dev/null
