"""Telemetry recorder, Prometheus and Grafana parts. A placeholder until its own issue: see README."""
