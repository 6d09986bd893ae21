#!/usr/bin/env bash
# Build the image from the root Dockerfile without a Docker daemon (buildah, rootless-capable, vfs
# storage) and run all four services from it against a broker and PostgreSQL on this machine:
# an event sent through the gateway must come back as a score and a decision.
#
#   deploy/image-check.sh                      # base image python:3.11-slim-bookworm from a registry
#   BASE=debootstrap deploy/image-check.sh     # no registry: a Debian bookworm base made here
#   BASE=localhost/debian-python:3.11-bookworm deploy/image-check.sh   # that base, made earlier
#
# Needs: buildah (apt-get install buildah), curl, PostgreSQL at 127.0.0.1:5432 (trust auth), the
# project's .venv (for the broker). With BASE=debootstrap also debootstrap and root.
# Extra build volumes (e.g. a proxy's CA bundle and pip.conf): BUILD_VOLUMES="-v a:b:ro -v c:d:ro".
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$(mktemp -d /tmp/churnguard-image-XXXXXX)}
B="buildah --storage-driver vfs"
IMAGE=localhost/churnguard:check
PG=${PG:-postgresql://postgres@127.0.0.1:5432}
DB=cg_image_check_$$

base_image=${BASE:-python:3.11-slim-bookworm}
if [ "$base_image" = debootstrap ]; then
  # Debian's own Python 3.11 (bookworm), with `python` and venv, as the official image has them.
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
  base=$($B from scratch)
  cp -a "$WORK/rootfs/." "$($B mount "$base")/"
  $B umount "$base" >/dev/null
  $B config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$base"
  $B commit -q "$base" localhost/debian-python:3.11-bookworm >/dev/null
  base_image=localhost/debian-python:3.11-bookworm
fi

echo "building $IMAGE from $base_image (log: $WORK/build.log)"
# shellcheck disable=SC2086
$B bud --isolation chroot --build-arg PYTHON_IMAGE="$base_image" ${BUILD_VOLUMES:-} -t "$IMAGE" "$REPO" >"$WORK/build.log"

ctr=$($B from "$IMAGE")
user=$($B run --isolation chroot "$ctr" -- id -u)
[ "$user" = 10001 ] || { echo "image runs as uid $user, not 10001" >&2; exit 1; }

port() { "$REPO/.venv/bin/python" -c "from shared.broker import free_port; print(free_port())"; }
BROKER=$(port); IN=$(port); SC=$(port); AC=$(port); GW=$(port)
"$REPO/.venv/bin/churnguard" broker --port "$BROKER" >"$WORK/broker.log" 2>&1 &
pids=($!)
psql "$PG/postgres" -qc "CREATE DATABASE $DB" >/dev/null
cleanup() {
  # `buildah run` does not pass signals on to the process it started in the container.
  pkill -TERM -f -- "churnguard serve [a-z]+ --host 127.0.0.1 --port ($IN|$SC|$AC|$GW)\$" 2>/dev/null || true
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null || true
  $B rm "$ctr" >/dev/null || true
}
trap cleanup EXIT

env_args=(-e "CHURNGUARD_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$BROKER" -e "CHURNGUARD_DATABASE_URL=$PG/$DB"
          -e CHURNGUARD_INTERNAL_TOKEN=image-check-token
          -e "CHURNGUARD_GATEWAY_INGEST_URL=http://127.0.0.1:$IN" -e "CHURNGUARD_GATEWAY_SCORING_URL=http://127.0.0.1:$SC"
          -e "CHURNGUARD_GATEWAY_ACTIONS_URL=http://127.0.0.1:$AC")
in_image() { $B run --isolation chroot --network host "${env_args[@]}" "$ctr" -- churnguard "$@"; }

in_image topics >"$WORK/topics.log"
in_image simulate --customers 800 >"$WORK/simulate.log"
in_image train >"$WORK/train.log"
for service in ingest:$IN scoring:$SC actions:$AC gateway:$GW; do
  in_image serve "${service%%:*}" --host 127.0.0.1 --port "${service##*:}" >"$WORK/${service%%:*}.log" 2>&1 &
  pids+=($!)
done
for service in ingest:$IN scoring:$SC actions:$AC gateway:$GW; do
  for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:${service##*:}/readyz" >/dev/null && break
    sleep 0.5
  done
  curl -sf "http://127.0.0.1:${service##*:}/readyz" >/dev/null || { echo "${service%%:*} not ready: $WORK/${service%%:*}.log" >&2; exit 1; }
done
key=$(in_image tenant create image-shop | sed -n 's/^API key (shown once): //p')
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
curl -sf -X POST "http://127.0.0.1:$GW/v1/events" -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
  -d "{\"id\":\"image-check-1\",\"type\":\"support.complaint\",\"customer_id\":\"c-image\",\"occurred_at\":\"$now\",\"source\":\"check\",\"data\":{\"ticket_id\":\"t1\"}}"
echo
for _ in $(seq 60); do
  decisions=$(curl -sf "http://127.0.0.1:$GW/v1/customers/c-image/decisions" -H "Authorization: Bearer $key" || true)
  [ -n "$decisions" ] && [ "$decisions" != "[]" ] && break
  sleep 0.5
done
curl -sf "http://127.0.0.1:$GW/v1/customers/c-image/score" -H "Authorization: Bearer $key" | head -c 200; echo
[ -n "$decisions" ] && [ "$decisions" != "[]" ] || { echo "no decision for the event" >&2; exit 1; }
echo "image check passed: four services from $IMAGE (uid 10001), event -> score -> decision"
