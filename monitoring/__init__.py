"""Monitoring: the telemetry recorder (``monitoring.recorder``: MQTT -> InfluxDB, see docs/recorder.md); the
Prometheus scrape config and alert rules in ``monitoring/prometheus/`` and the Grafana provisioning and dashboards
in ``monitoring/grafana/`` (see docs/observability.md)."""
