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

# A device identity issued by the cluster's CA (every node's data dir holds it).
openssl ecparam -name prime256v1 -genkey -noout -out "$work/device.key" 2>/dev/null
openssl req -new -key "$work/device.key" -subj "/CN=$udid" -out "$work/device.csr"
printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n' >"$work/ext.cnf"
openssl x509 -req -in "$work/device.csr" -CA "$work/data-0/identity-ca.pem" -CAkey "$work/data-0/identity-ca.key" \
  -CAcreateserial -days 30 -extfile "$work/ext.cnf" -outform DER -out "$work/device.der" 2>/dev/null
cert_header=":$(base64 -w0 "$work/device.der"):"
for message in Authenticate.2 TokenUpdate.2; do
  curl -fs -X PUT -H 'Content-Type: application/x-apple-aspen-mdm-checkin' -H "X-Client-Cert: $cert_header" \
    --data-binary "@tests/fixtures/nanomdm/$message.plist" "http://127.0.0.1:9210/mdm"
done
owner=$(curl -fs -H 'Authorization: Bearer bench' "http://127.0.0.1:9210/api/v1/devices/$udid" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["owner"][-1])')
other=$((1 - owner))

idle="<?xml version=\"1.0\" encoding=\"UTF-8\"?><plist version=\"1.0\"><dict><key>Status</key><string>Idle</string><key>UDID</key><string>$udid</string></dict></plist>"
cat >"$work/idle.lua" <<LUA
wrk.method = "PUT"
wrk.body = '$idle'
wrk.headers["Content-Type"] = "application/x-apple-aspen-mdm"
wrk.headers["X-Client-Cert"] = "$cert_header"
function response(status, headers, body)
  if status ~= 200 then
    io.stderr:write("unexpected status " .. status .. "\n")
    os.exit(1)
  end
end
LUA

for round in 1 2; do
  for target in "$owner:the owner" "$other:a forwarding node"; do
    node=${target%%:*}
    echo "== round $round: Connect Idle through node-$node (${target#*:}), 16 connections, ${duration}s"
    wrk -t1 -c16 -d"${duration}s" --latency -s "$work/idle.lua" "http://127.0.0.1:$((9210 + node))/mdm"
  done
done
