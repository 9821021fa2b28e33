"""Monitoring: the telemetry recorder (``monitoring.recorder``: MQTT -> InfluxDB, see docs/recorder.md).
Prometheus and Grafana parts follow in their own issues; see the README."""
