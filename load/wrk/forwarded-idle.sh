#!/usr/bin/env bash
# The cost of forwarding: Connect Idle for one enrolled device through the node that owns
# it and through a node that forwards to the owner, two Orchard nodes on one CQL keyspace
# (cluster mode), each node pinned to its own core, wrk unpinned. The same request, the
# same device, the same run, alternating twice.
#
#   load/wrk/forwarded-idle.sh HOST:PORT [DURATION_SECONDS]
#
# HOST:PORT names a CQL node (ScyllaDB or Cassandra). Needs a release build, wrk,
# openssl, curl, python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
. load/wrk/device.sh
cql=${1:?usage: forwarded-idle.sh CQL_HOST:PORT [DURATION_SECONDS]}
duration=${2:-15}
udid=66ADE930-5FDF-5EC4-8429-15640684C489
keyspace=orchard_fwd_$(date +%s)
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT

for node in 0 1; do
  taskset -c "$node" target/release/orchard serve --listen "127.0.0.1:$((9210 + node))" \
    --data-dir "$work/data-$node" --api-key bench --client-cert-header X-Client-Cert --workers 1 \
    --store scylla --scylla-nodes "$cql" --scylla-keyspace "$keyspace" --scylla-replication 1 \
    --cluster-secret bench --node-id "node-$node" >"$work/node-$node.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do curl -fs "http://127.0.0.1:$((9210 + node))/readyz" >/dev/null && break; sleep 0.1; done
done
# Both nodes hold half of the shards each before measuring.
for _ in $(seq 300); do
  curl -fs -H 'Authorization: Bearer bench' http://127.0.0.1:9210/api/v1/cluster |
    python3 -c 'import json,sys; v=json.load(sys.stdin); s=[n["shards"] for n in v["nodes"] if n["alive"]]; sys.exit(0 if len(s)==2 and min(s)>=1800 and v["shards_unowned"]==0 else 1)' && break
  sleep 0.2
done

# A device identity issued by the cluster's own CA, enrolled, and its Idle connect.
cert_header=$(issue_identity "$work/data-0" "$work" "$udid")
enroll "http://127.0.0.1:9210" "$cert_header"
owner=$(curl -fs -H 'Authorization: Bearer bench' "http://127.0.0.1:9210/api/v1/devices/$udid" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["owner"][-1])')
other=$((1 - owner))
write_idle_lua "$work/idle.lua" "$udid" "$cert_header"

for round in 1 2; do
  for target in "$owner:the owner" "$other:a forwarding node"; do
    node=${target%%:*}
    echo "== round $round: Connect Idle through node-$node (${target#*:}), 16 connections, ${duration}s"
    wrk -t1 -c16 -d"${duration}s" --latency -s "$work/idle.lua" "http://127.0.0.1:$((9210 + node))/mdm"
  done
done
