#!/usr/bin/env bash
# Make schemathesis (the API fuzzer, from PyPI) available for the API-FUZZ
# test: installs one pinned version into a virtual environment under
# target/tools/ when it is not there yet, and with --print-env prints the
# line that points the test at it:
#   export CELLMON_SCHEMATHESIS=<path to its `st` command>
# Idempotent. Needs Python 3 with venv (Debian: python3-venv, installed when
# missing, which needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=4.32.5
VENV=target/tools/schemathesis-$VERSION
log() { printf 'ensure-schemathesis: %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/st" ]; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    log "installing python3-venv"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q python3-venv >/dev/null
  fi
  log "installing schemathesis $VERSION into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$VERSION"
fi
"$VENV/bin/st" --version >/dev/null
if [ "${1:-}" = "--print-env" ]; then
  printf 'export CELLMON_SCHEMATHESIS=%s\n' "$PWD/$VENV/bin/st"
fi
