#!/bin/sh
# Dev TLS material for the mTLS + ACL deployment: a CA, the broker's server certificate
# (SAN kafka), and one client certificate per principal (CN = principal). Kafka reads PEM key
# stores with the key and the certificate in one file, so those are concatenated too.
#   sh compose/kafka-acl/make-certs.sh [clinician ...]
set -eu
cd "$(dirname "$0")/../.."
OUT=compose/kafka-acl/certs
python scripts/gen_dev_certs.py --out "$OUT" --hosts kafka localhost 127.0.0.1 \
  --hospitals admin gateway accountant router auditor st_mary city_general northside "$@"
cat "$OUT/server.key" "$OUT/server.pem" > "$OUT/server.keystore.pem"
for p in admin gateway accountant router auditor st_mary city_general northside "$@"; do
  cat "$OUT/client-$p.key" "$OUT/client-$p.pem" > "$OUT/client-$p.keystore.pem"
done
cat > "$OUT/admin.properties" <<PROPS
security.protocol=SSL
ssl.truststore.type=PEM
ssl.truststore.location=/certs/ca.pem
ssl.keystore.type=PEM
ssl.keystore.location=/certs/client-admin.keystore.pem
PROPS
chmod 0644 "$OUT"/*.pem "$OUT/admin.properties"
echo "certificates in $OUT"
