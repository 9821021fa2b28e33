"""Test helper: the private Prometheus of ``monitoring.local`` (shared with the benchmark), re-exported."""

from monitoring.local import PrometheusServer, PromQueryError, Sample, find_prometheus, value

__all__ = ["PromQueryError", "PrometheusServer", "Sample", "find_prometheus", "value"]
