#!/bin/sh
# docker compose one-shot service "nats-config" (profile cluster): writes the 3-node NATS cluster's files into the
# volume the nats-1..3 services mount at /nats/conf: nats-1.conf .. nats-3.conf (routes, JetStream, MQTT, monitoring)
# and accounts.conf, the same accounts as the Mosquitto stack (broker/compose/init-accounts.sh) with permissions
# derived from the same role table (python -m broker.nats, broker/nats/config.py). Written on every
# `docker compose --profile cluster up`; after a change run `docker compose kill -s HUP nats-1 nats-2 nats-3`
# (a reload: no restart, connections stay). Accounts are not added at runtime on the cluster (docs/scaling.md).
#
# Environment: as init-accounts.sh (SUBSTATIONS, EV_COUNT, EV_ID_PREFIX, MQTT_ACCOUNT_SECRET, the service
# passwords, GRID_TOPIC_PREFIX, EV_1234_MQTT_PASSWORD) and NATS_CONF_DIR (where to write; tests).
set -eu

out=${NATS_CONF_DIR:-/nats/conf}
ids=$(printf '%s' "$SUBSTATIONS" | sed -e 's/:[^,]*//g')

python -m broker.nats config --out "$out" --nodes 3 --hosts nats-1,nats-2,nats-3 \
    --store-dir /data/jetstream \
    --prefix "${GRID_TOPIC_PREFIX:-grid/v1}" \
    --substations "$ids" \
    --ev-count "${EV_COUNT:-200}" --ev-prefix "${EV_ID_PREFIX:-EV_}" \
    --ev-password "EV_1234=$EV_1234_MQTT_PASSWORD" \
    --service "balancer=$BALANCER_MQTT_PASSWORD" \
    --service "api=$API_MQTT_PASSWORD" \
    --service "observer=$OBSERVER_MQTT_PASSWORD" \
    --service "healthcheck=$HEALTHCHECK_MQTT_PASSWORD" \
    --service "recorder=$RECORDER_MQTT_PASSWORD"
