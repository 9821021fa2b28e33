#!/bin/sh
# docker compose one-shot service "mqtt-accounts": writes the Mosquitto password file and ACL
# (python -m broker.accounts) into the volume the broker mounts read-only at /mosquitto/auth, then
# hands them to the broker's user (uid 1883 in the eclipse-mosquitto image; the files are mode 0600).
# Runs on every `docker compose up`; the broker reads the files only when it starts, so after changing
# passwords in .env run `docker compose up -d && docker compose restart mosquitto`.
#
# Environment (from .env through docker-compose.yml):
#   SUBSTATIONS            id:capacity_kw list, e.g. north:400,central:300,south:250 (ids are used here)
#   EV_COUNT, EV_ID_PREFIX EV accounts EV_0001 .. (passwords derived from MQTT_ACCOUNT_SECRET)
#   MQTT_ACCOUNT_SECRET    secret of the derived substation and EV passwords (read by broker.accounts)
#   BALANCER_MQTT_PASSWORD, API_MQTT_PASSWORD, OBSERVER_MQTT_PASSWORD, RECORDER_MQTT_PASSWORD,
#   HEALTHCHECK_MQTT_PASSWORD  service accounts
#   GRID_TOPIC_PREFIX      topic prefix the ACL is rendered with
set -eu

out=${MQTT_AUTH_DIR:-/mosquitto/auth}
# "north:400,central:300" -> "north,central"
ids=$(printf '%s' "$SUBSTATIONS" | sed -e 's/:[^,]*//g')

python -m broker.accounts --out "$out" \
    --prefix "${GRID_TOPIC_PREFIX:-grid/v1}" \
    --substations "$ids" \
    --ev-count "${EV_COUNT:-200}" --ev-prefix "${EV_ID_PREFIX:-EV_}" \
    --service "balancer=$BALANCER_MQTT_PASSWORD" \
    --service "api=$API_MQTT_PASSWORD" \
    --service "observer=$OBSERVER_MQTT_PASSWORD" \
    --service "healthcheck=$HEALTHCHECK_MQTT_PASSWORD" \
    --service "recorder=$RECORDER_MQTT_PASSWORD"

chown "${MQTT_BROKER_UID:-1883}:${MQTT_BROKER_UID:-1883}" "$out/passwd" "$out/acl"
