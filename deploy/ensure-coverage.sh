#!/usr/bin/env bash
# Make line coverage measurable: cargo-llvm-cov, and an llvm-cov and
# llvm-profdata that read this rustc's profiles. Installs what is missing;
# idempotent. Needs root when it has to install Debian's LLVM.
#
# Usage: deploy/ensure-coverage.sh [--print-env | --cargo-llvm-cov-only]
#   --print-env             print `export LLVM_COV=...` and
#                           `export LLVM_PROFDATA=...` lines for cargo-llvm-cov
#   --cargo-llvm-cov-only   install cargo-llvm-cov when missing, nothing else
#                           (no root, no apt: scripts/test runs this in the
#                           background while the engine and images install)
#
# rustc writes raw profiles in the format of the LLVM it is built on, and
# that format changes between LLVM major versions. rustup's `llvm-tools` is
# that very LLVM, but rustup cannot always fetch it; Debian's `llvm-N` of the
# same major reads the same format (checked: rustc 1.95.0, built on LLVM
# 22.1.2, with Debian's llvm-22 22.1.8). Tools named in the environment, then
# rustup's, then Debian's are used, in that order; a major-version mismatch
# is an error rather than a misread profile. With both variables set,
# cargo-llvm-cov never tries to run rustup itself.
set -euo pipefail

# Pinned so that every machine measures with the same tool.
CARGO_LLVM_COV_VERSION=0.9.1

log() { printf 'ensure-coverage: %s\n' "$*" >&2; }

# Runs COMMAND... and logs how long it took: these are the minutes a fresh
# machine pays before the first coverage run.
timed() {
  local what=$1 started
  shift
  started=$(date +%s)
  "$@"
  log "$what in $(($(date +%s) - started)) s"
}

# Compiles for about two minutes, mostly on one core.
ensure_cargo_llvm_cov() {
  if ! cargo llvm-cov --version >/dev/null 2>&1; then
    log "installing cargo-llvm-cov $CARGO_LLVM_COV_VERSION"
    timed "installed cargo-llvm-cov" \
      cargo install --locked --quiet "cargo-llvm-cov@$CARGO_LLVM_COV_VERSION"
  fi
}

if [ "${1:-}" = "--cargo-llvm-cov-only" ]; then
  ensure_cargo_llvm_cov
  exit 0
fi

rustc_info=$(rustc -vV)
llvm_major=$(sed -n 's/^LLVM version: \([0-9]*\).*/\1/p' <<<"$rustc_info")
host=$(sed -n 's/^host: //p' <<<"$rustc_info")
if [ -z "$llvm_major" ] || [ -z "$host" ]; then
  log "cannot read rustc's LLVM version and host from \`rustc -vV\`"
  exit 1
fi

# Sets LLVM_COV and LLVM_PROFDATA from the first place that has both.
find_tools() {
  if [ -n "${LLVM_COV:-}" ] && [ -n "${LLVM_PROFDATA:-}" ]; then
    return 0
  fi
  local dir
  for dir in "$(rustc --print sysroot)/lib/rustlib/$host/bin" "/usr/lib/llvm-$llvm_major/bin"; do
    if [ -x "$dir/llvm-cov" ] && [ -x "$dir/llvm-profdata" ]; then
      LLVM_COV=$dir/llvm-cov
      LLVM_PROFDATA=$dir/llvm-profdata
      return 0
    fi
  done
  return 1
}

install_llvm() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  # Recommends would add llvm-N-dev (headers and static libraries, 50 MB).
  apt-get install -y -q --no-install-recommends "llvm-$llvm_major" >/dev/null
}

if ! find_tools; then
  log "installing Debian's llvm-$llvm_major (rustc is built on LLVM $llvm_major)"
  timed "installed llvm-$llvm_major" install_llvm
  find_tools || {
    log "llvm-$llvm_major is installed but /usr/lib/llvm-$llvm_major/bin has no llvm-cov"
    exit 1
  }
fi

for tool in "$LLVM_COV" "$LLVM_PROFDATA"; do
  tool_major=$("$tool" --version | sed -n 's/.*LLVM version \([0-9]*\).*/\1/p')
  if [ "$tool_major" != "$llvm_major" ]; then
    log "$tool is LLVM ${tool_major:-?}, rustc is LLVM $llvm_major: it would misread the profiles"
    exit 1
  fi
done

ensure_cargo_llvm_cov

if [ "${1:-}" = "--print-env" ]; then
  printf 'export LLVM_COV=%s\n' "$LLVM_COV"
  printf 'export LLVM_PROFDATA=%s\n' "$LLVM_PROFDATA"
fi
