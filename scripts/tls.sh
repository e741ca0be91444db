#!/usr/bin/env bash
# Test certificates, made on this machine (never committed), idempotently:
#   scripts/tls.sh make DIR
# DIR/ca.crt, ca.key            the suite's CA
# DIR/server.crt, server.key    localhost / 127.0.0.1, signed by the CA (PostgreSQL, Kafka)
# DIR/kafka-keystore.pem        server key (PKCS#8) + certificate, Kafka's PEM keystore
# DIR/other-ca.crt              a CA that signed nothing here (the "unknown CA" case)
# DIR/expired.crt, expired.key  a client certificate of the CA that expired in 2020
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=tls
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$SCRIPT_DIR/lib.sh"

make_all() {
  local dir="$1"
  need_cmd openssl "apt-get install openssl"
  mkdir -p "$dir"
  # Rebuilt when missing or when the server certificate expires within a week.
  if [[ -s "$dir/expired.crt" && -s "$dir/kafka-keystore.pem" ]] &&
      openssl x509 -checkend 604800 -noout -in "$dir/server.crt" >/dev/null 2>&1; then
    return 0
  fi
  exec 7>"$dir/.lock"
  flock -w 60 7 || die "another scripts/tls.sh holds $dir/.lock"
  local tmp
  tmp="$(mktemp -d "$dir/.make.XXXXXX")"
  (
    cd "$tmp"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=outbox-relay test CA" \
      -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=some other CA" \
      -keyout other-ca.key -out other-ca.crt 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' >server.ext
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
      -extfile server.ext -out server.crt 2>/dev/null
    openssl pkcs8 -topk8 -nocrypt -in server.key -out server.pk8
    cat server.pk8 server.crt >kafka-keystore.pem
    # An expired certificate: `openssl ca` takes explicit dates.
    mkdir -p ca-db
    : >ca-db/index.txt
    echo 1000 >ca-db/serial
    cat >ca.cnf <<'EOF'
[ca]
default_ca = test
[test]
database = ca-db/index.txt
serial = ca-db/serial
new_certs_dir = ca-db
default_md = sha256
policy = any
[any]
commonName = supplied
EOF
    openssl req -newkey rsa:2048 -nodes -subj "/CN=expired relay client" \
      -keyout expired.key -out expired.csr 2>/dev/null
    openssl ca -batch -config ca.cnf -cert ca.crt -keyfile ca.key -in expired.csr \
      -startdate 20200101000000Z -enddate 20200102000000Z -out expired.crt 2>/dev/null
    chmod 644 ./*.crt ./*.pem
    chmod 600 ./*.key
  )
  local f
  for f in ca.crt ca.key other-ca.crt server.crt server.key kafka-keystore.pem expired.crt expired.key; do
    mv "$tmp/$f" "$dir/$f"
  done
  rm -rf "$tmp"
  log "certificates in $dir"
}

case "${1:-}" in
  make) [[ $# -eq 2 ]] || die "usage: $0 make DIR"; make_all "$2" ;;
  *) echo "usage: $0 make DIR" >&2; exit 2 ;;
esac
