#!/usr/bin/env bash
# Connect Idle for one enrolled device over HTTP, identity in the proxy header, server
# pinned to one core on the durable embedded store; wrk runs on the other core.
#
#   load/wrk/connect-idle.sh [DURATION_SECONDS]
#
# Needs: a release build (cargo build --release), wrk, openssl, curl.
set -euo pipefail
cd "$(dirname "$0")/../.."
duration=${1:-15}
port=${ORCHARD_BENCH_PORT:-9104}
udid=66ADE930-5FDF-5EC4-8429-15640684C489
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT

taskset -c 0 target/release/orchard serve --listen "127.0.0.1:$port" --data-dir "$work/data" \
  --api-key bench --client-cert-header X-Client-Cert --workers 1 >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done

# A device identity issued by the server's own CA.
openssl ecparam -name prime256v1 -genkey -noout -out "$work/device.key" 2>/dev/null
openssl req -new -key "$work/device.key" -subj "/CN=$udid" -out "$work/device.csr"
printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n' >"$work/ext.cnf"
openssl x509 -req -in "$work/device.csr" -CA "$work/data/identity-ca.pem" -CAkey "$work/data/identity-ca.key" \
  -CAcreateserial -days 30 -extfile "$work/ext.cnf" -outform DER -out "$work/device.der" 2>/dev/null
cert_header=":$(base64 -w0 "$work/device.der"):"

for message in Authenticate.2 TokenUpdate.2; do
  curl -fs -X PUT -H 'Content-Type: application/x-apple-aspen-mdm-checkin' -H "X-Client-Cert: $cert_header" \
    --data-binary "@tests/fixtures/nanomdm/$message.plist" "http://127.0.0.1:$port/mdm"
done

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

for connections in 16 64; do
  echo "== Connect Idle, $connections connections, ${duration}s"
  taskset -c 1 wrk -t1 -c"$connections" -d"${duration}s" --latency -s "$work/idle.lua" "http://127.0.0.1:$port/mdm"
done
