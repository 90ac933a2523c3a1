#!/usr/bin/env bash
# Connect Idle for one enrolled device over HTTP, identity in the proxy header, server
# pinned to one core on the durable embedded store; wrk runs on the other core.
#
#   load/wrk/connect-idle.sh [DURATION_SECONDS]
#
# Needs: a release build (cargo build --release), wrk, openssl, curl.
set -euo pipefail
cd "$(dirname "$0")/../.."
. load/wrk/device.sh
duration=${1:-15}
port=${ORCHARD_BENCH_PORT:-9104}
udid=66ADE930-5FDF-5EC4-8429-15640684C489
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT

taskset -c 0 target/release/orchard serve --listen "127.0.0.1:$port" --data-dir "$work/data" \
  --api-key bench --client-cert-header X-Client-Cert --workers 1 >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done

# A device identity issued by the server's own CA, enrolled, and its Idle connect.
cert_header=$(issue_identity "$work/data" "$work" "$udid")
enroll "http://127.0.0.1:$port" "$cert_header"
write_idle_lua "$work/idle.lua" "$udid" "$cert_header"

for connections in 16 64; do
  echo "== Connect Idle, $connections connections, ${duration}s"
  taskset -c 1 wrk -t1 -c"$connections" -d"${duration}s" --latency -s "$work/idle.lua" "http://127.0.0.1:$port/mdm"
done
