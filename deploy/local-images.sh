#!/usr/bin/env bash
# Build local stand-ins for the official Postgres, Redis and InfluxDB images from
# Debian packages, for machines that run a Docker engine but reach no image
# registry. One debootstrap root file system is imported once; each image is that
# base plus its own start command, so all three share one layer.
#
# Usage: deploy/local-images.sh [--print-env]
#   --print-env  print `export CELLMON_*_IMAGE=...` lines for the built images
#
# The images behave like the official ones where the harness relies on it:
# Postgres on 5432 with trust auth (user and database `postgres`, extra
# arguments are passed to `postgres`), Redis on 6379 started by the command it
# is given, InfluxDB 1.x on 8086.
set -euo pipefail

# Bump when the recipe changes so stale images are rebuilt.
RECIPE=r1
SUITE=bookworm
PG_MAJOR=15
BASE="cellmon-local/base:${SUITE}-${RECIPE}"
PG_IMAGE="cellmon-local/postgres:${PG_MAJOR}-${RECIPE}"
REDIS_IMAGE="cellmon-local/redis:7-${RECIPE}"
INFLUX_IMAGE="cellmon-local/influxdb:1-${RECIPE}"

log() { printf 'local-images: %s\n' "$*" >&2; }

# The temporary root file system, removed on any exit (success, failure, or
# a `set -e` abort half-way through).
ROOTFS=""
cleanup() {
  if [ -n "$ROOTFS" ]; then
    rm -rf "$ROOTFS"
  fi
}
trap cleanup EXIT

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

print_env() {
  printf 'export CELLMON_POSTGRES_IMAGE=%s\n' "$PG_IMAGE"
  printf 'export CELLMON_REDIS_IMAGE=%s\n' "$REDIS_IMAGE"
  printf 'export CELLMON_INFLUX_IMAGE=%s\n' "$INFLUX_IMAGE"
}

build_base() {
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q debootstrap >/dev/null
  fi
  ROOTFS=$(mktemp -d /var/tmp/cellmon-rootfs.XXXXXX)
  local rootfs=$ROOTFS
  # mktemp makes the directory 0700; as the image's / it would lock out every
  # user but root (postgres among them).
  chmod 0755 "$rootfs"
  log "debootstrap $SUITE into $rootfs (about 2 minutes)"
  debootstrap --variant=minbase \
    --include="postgresql-${PG_MAJOR},redis-server,influxdb,ca-certificates" \
    "$SUITE" "$rootfs" >/var/tmp/cellmon-debootstrap.log 2>&1 || {
      tail -n 30 /var/tmp/cellmon-debootstrap.log >&2
      return 1
    }

  # Postgres: a cluster initialised at build time keeps container start-up near
  # one second; each container gets its own copy-on-write copy of it.
  local pgbin="/usr/lib/postgresql/${PG_MAJOR}/bin"
  chroot "$rootfs" sh -c "mkdir -p /var/lib/postgresql/data /run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /run/postgresql \
    && runuser -u postgres -- ${pgbin}/initdb -D /var/lib/postgresql/data \
         --auth=trust --username=postgres --encoding=UTF8 --locale=C.UTF-8 >/dev/null"
  printf 'host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n' \
    >>"$rootfs/var/lib/postgresql/data/pg_hba.conf"
  cat >"$rootfs/usr/local/bin/cellmon-postgres" <<SH
#!/bin/sh
# Start Postgres like the official image: arguments are postgres options.
set -e
mkdir -p /run/postgresql && chown postgres:postgres /run/postgresql
exec runuser -u postgres -- ${pgbin}/postgres -D /var/lib/postgresql/data \\
  -c listen_addresses='*' "\$@"
SH
  chmod +x "$rootfs/usr/local/bin/cellmon-postgres"
  mkdir -p "$rootfs/data"
  # Trim what a server image does not need.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc "$rootfs"/usr/share/man

  log "importing base image $BASE"
  tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
  rm -rf "$rootfs"
  ROOTFS=""
}

derive() { # image, then --change arguments
  local image=$1 cid
  shift
  cid=$(docker create "$BASE" /bin/true)
  if ! docker commit "$@" "$cid" "$image" >/dev/null; then
    docker rm "$cid" >/dev/null
    return 1
  fi
  docker rm "$cid" >/dev/null
  log "built $image"
}

main() {
  if [ "${1:-}" = "--print-env" ] && have_image "$PG_IMAGE" && have_image "$REDIS_IMAGE" \
    && have_image "$INFLUX_IMAGE"; then
    print_env
    return
  fi
  have_image "$BASE" || build_base
  have_image "$PG_IMAGE" || derive "$PG_IMAGE" \
    --change 'ENTRYPOINT ["/usr/local/bin/cellmon-postgres"]' --change 'CMD []' \
    --change 'EXPOSE 5432'
  have_image "$REDIS_IMAGE" || derive "$REDIS_IMAGE" \
    --change 'WORKDIR /data' --change 'CMD ["redis-server", "--protected-mode", "no"]' \
    --change 'EXPOSE 6379'
  have_image "$INFLUX_IMAGE" || derive "$INFLUX_IMAGE" \
    --change 'CMD ["influxd", "-config", "/etc/influxdb/influxdb.conf"]' \
    --change 'EXPOSE 8086'
  if [ "${1:-}" = "--print-env" ]; then
    print_env
  fi
}

main "$@"
