# One simulated device for the wrk scripts (sourced): an identity issued by an Orchard
# CA, its enrollment, and the wrk script that sends its Idle connect.

# issue_identity CA_DIR WORK_DIR UDID: prints the RFC 9440 certificate header value.
issue_identity() {
  local ca=$1 work=$2 udid=$3
  openssl ecparam -name prime256v1 -genkey -noout -out "$work/device.key" 2>/dev/null
  openssl req -new -key "$work/device.key" -subj "/CN=$udid" -out "$work/device.csr"
  printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n' >"$work/ext.cnf"
  openssl x509 -req -in "$work/device.csr" -CA "$ca/identity-ca.pem" -CAkey "$ca/identity-ca.key" \
    -CAcreateserial -days 30 -extfile "$work/ext.cnf" -outform DER -out "$work/device.der" 2>/dev/null
  echo ":$(base64 -w0 "$work/device.der"):"
}

# enroll BASE_URL CERT_HEADER: Authenticate + TokenUpdate from the real fixtures.
enroll() {
  local base=$1 cert_header=$2 message
  for message in Authenticate.2 TokenUpdate.2; do
    curl -fs -X PUT -H 'Content-Type: application/x-apple-aspen-mdm-checkin' -H "X-Client-Cert: $cert_header" \
      --data-binary "@tests/fixtures/nanomdm/$message.plist" "$base/mdm"
  done
}

# write_idle_lua FILE UDID CERT_HEADER: a wrk script that fails on any answer but 200.
write_idle_lua() {
  local file=$1 udid=$2 cert_header=$3
  local idle="<?xml version=\"1.0\" encoding=\"UTF-8\"?><plist version=\"1.0\"><dict><key>Status</key><string>Idle</string><key>UDID</key><string>$udid</string></dict></plist>"
  cat >"$file" <<LUA
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
}
