# Helpers shared by scripts/test and scripts/up. Source it; do not run it.

# step NAME COMMAND...: runs COMMAND with a heading and its wall time.
step() {
  local name=$1 started status=0
  shift
  printf '\n==> %s\n' "$name" >&2
  started=$(date +%s)
  "$@" || status=$?
  printf '<== %s: %s in %ss\n' "$name" "$([ "$status" = 0 ] && echo ok || echo "FAILED ($status)")" \
    "$(($(date +%s) - started))" >&2
  return "$status"
}

# Exports CELLMON_*_IMAGE for every backend whose image is not named yet,
# building the local images from Debian packages when they are missing.
use_backend_images() {
  if [ -n "${CELLMON_POSTGRES_IMAGE:-}" ] && [ -n "${CELLMON_REDIS_IMAGE:-}" ] \
    && [ -n "${CELLMON_INFLUX_IMAGE:-}" ]; then
    return
  fi
  local env_lines
  env_lines=$(step "local backend images" bash deploy/local-images.sh --print-env)
  export_unset "$env_lines"
}

# export_unset LINES: exports each `export NAME=VALUE` line of LINES whose
# NAME is not set yet, so the caller's environment always wins.
export_unset() {
  local line assignment name
  while IFS= read -r line; do
    assignment=${line#export }
    name=${assignment%%=*}
    if [ -z "${!name:-}" ]; then
      export "${assignment?}"
      printf '    %s\n' "$assignment" >&2
    fi
  done <<<"$1"
}
