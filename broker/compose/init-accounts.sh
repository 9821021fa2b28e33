#!/bin/sh
# docker compose one-shot service "mqtt-accounts": writes the state file of Mosquitto's dynamic security plugin
# (python -m broker.accounts: accounts, roles, grants) into the volume the broker mounts at /mosquitto/auth,
# then hands it to the broker's user (uid 1883 in the eclipse-mosquitto image; the file is mode 0600).
# Runs on every `docker compose up`. The broker rewrites the file when accounts are added or removed at
# runtime (the API's POST/DELETE /substations, /evs), so an existing file is merged, not replaced: those
# accounts are kept, the shared roles brought up to date and the passwords below set. The broker reads the file
# when it starts: after changing passwords in .env run `docker compose up -d && docker compose restart mosquitto`.
#
# Environment (from .env through docker-compose.yml):
#   SUBSTATIONS            id:capacity_kw list, e.g. north:400,central:300,south:250 (ids are used here)
#   EV_COUNT, EV_ID_PREFIX EV accounts EV_0001 .. (passwords derived from MQTT_ACCOUNT_SECRET)
#   MQTT_ACCOUNT_SECRET    secret of the derived substation and EV passwords (read by broker.accounts)
#   BALANCER_MQTT_PASSWORD, API_MQTT_PASSWORD, OBSERVER_MQTT_PASSWORD, RECORDER_MQTT_PASSWORD,
#   HEALTHCHECK_MQTT_PASSWORD, PROVISIONER_MQTT_PASSWORD  service accounts
#   GRID_TOPIC_PREFIX      topic prefix the grants are written for
#   EV_1234_MQTT_PASSWORD  the README's hand-test EV
#   API_EV_TOKEN, API_VIEWER_TOKEN  the README's hand-test API tokens (their hashes go to the API's token file)
#   MQTT_AUTH_DIR, MQTT_CERTS_DIR, API_AUTH_DIR, MQTT_BROKER_UID  where to write, and the broker's user (tests)
set -eu

out=${MQTT_AUTH_DIR:-/mosquitto/auth}
# "north:400,central:300" -> "north,central"
ids=$(printf '%s' "$SUBSTATIONS" | sed -e 's/:[^,]*//g')

python -m broker.accounts --out "$out" --merge \
    --prefix "${GRID_TOPIC_PREFIX:-grid/v1}" \
    --substations "$ids" \
    --ev-count "${EV_COUNT:-200}" --ev-prefix "${EV_ID_PREFIX:-EV_}" \
    --ev-password "EV_1234=$EV_1234_MQTT_PASSWORD" \
    --service "balancer=$BALANCER_MQTT_PASSWORD" \
    --service "api=$API_MQTT_PASSWORD" \
    --service "observer=$OBSERVER_MQTT_PASSWORD" \
    --service "healthcheck=$HEALTHCHECK_MQTT_PASSWORD" \
    --service "recorder=$RECORDER_MQTT_PASSWORD" \
    --service "provisioner=$PROVISIONER_MQTT_PASSWORD"

# The broker rewrites the file (and its directory gets a temporary file): both belong to the broker's user.
uid=${MQTT_BROKER_UID:-1883}
chown "$uid:$uid" "$out" "$out/dynsec.json"

# The TLS listener's certificates (a private CA; clients verify with ca.crt), made once. The server name
# "mosquitto" (inside compose), "localhost" and 127.0.0.1 (through the published port) are in the certificate.
certs=${MQTT_CERTS_DIR:-/mosquitto/certs}
if [ ! -s "$certs/server.crt" ]; then
    TLS_EXTRA_SAN="DNS:mosquitto" sh "$(dirname "$0")/../tls/make-certs.sh" "$certs"
    rm -f "$certs/ca.key"  # nothing more is signed with it; a new CA is made if the volume is emptied
fi
chown "$uid:$uid" "$certs/server.key"
chmod 0644 "$certs/ca.crt" "$certs/server.crt"

# The API's scoped tokens for hand testing, as the README uses them: EV_1234's own and a viewer's (SHA-256
# hashes only; the tokens stay in .env). Written every run, so changed tokens in .env take effect.
api_auth=${API_AUTH_DIR:-/api-auth}
mkdir -p "$api_auth"
python -m api.tokens from-env "$api_auth/api-tokens.json" \
    --token "hand-test-EV_1234:ev:EV_1234=API_EV_TOKEN" --token "hand-test-viewer:viewer=API_VIEWER_TOKEN"
chmod 0644 "$api_auth/api-tokens.json"  # (hashes: read by the API's user)
