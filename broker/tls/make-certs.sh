#!/bin/sh
# Create a private CA and a server certificate for the broker's TLS listener.
#
#   broker/tls/make-certs.sh OUT_DIR [DAYS]
#
# Writes OUT_DIR/ca.crt, ca.key, server.crt, server.key (the names broker.local.render_config expects).
# The server certificate is valid for localhost and 127.0.0.1 (subjectAltName: clients check the SAN,
# not the CN) plus the names in $TLS_EXTRA_SAN, e.g. TLS_EXTRA_SAN="DNS:mosquitto,DNS:broker.example"
# for docker compose. Keys are P-256 EC (generated in milliseconds, supported by Mosquitto and Python).
# Clients verify the server with ca.crt: paho `client.tls_set(ca_certs="OUT_DIR/ca.crt")`.
#
# This is a development/test CA: keep ca.key out of deployments and out of git.
set -eu

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 OUT_DIR [DAYS]" >&2
    exit 2
fi
out=$1
days=${2:-825}
san="DNS:localhost,IP:127.0.0.1"
if [ -n "${TLS_EXTRA_SAN:-}" ]; then
    san="$san,$TLS_EXTRA_SAN"
fi

mkdir -p "$out"
umask 077  # private keys readable by their owner only
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$out/ca.key" -out "$out/ca.crt" -days "$days" \
    -subj "/CN=Smart Grid Load Balancer dev CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }

openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$out/server.key" -out "$tmp/server.csr" \
    -subj "/CN=localhost" 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }

cat >"$tmp/server.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san
EOF

openssl x509 -req -in "$tmp/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -set_serial "0x$(openssl rand -hex 8)" -days "$days" -extfile "$tmp/server.ext" \
    -out "$out/server.crt" 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }

chmod 644 "$out/ca.crt" "$out/server.crt"
echo "wrote $out/ca.crt $out/server.crt $out/server.key (SAN $san, $days days)"
