"""The InfluxDB v2 sink: one synchronous ``/api/v2/write`` per batch (called from the writer's thread).

The client's own retries stay off (``retries=False`` is its default) and its batching write mode is not
used: retrying, batching and counting are the writer's, so no point can be lost without being counted.
Points arrive as line-protocol lines (built on the MQTT side, ``points.py``) with microsecond timestamps;
the batch is joined here, in the worker thread.
"""

from __future__ import annotations

from typing import Any

from influxdb_client import InfluxDBClient, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS

from monitoring.recorder.settings import InfluxSettings


class InfluxSink:
    def __init__(self, settings: InfluxSettings) -> None:
        self.settings = settings
        self._client = InfluxDBClient(url=settings.url, token=settings.token.get_secret_value(), org=settings.org,
                                      timeout=int(settings.timeout_s * 1000), enable_gzip=settings.gzip)
        self._api = self._client.write_api(write_options=SYNCHRONOUS)

    def __call__(self, batch: list[str]) -> None:
        body = "\n".join(batch)
        precision: Any = WritePrecision.US  # a str constant; the client's stubs say WritePrecision
        self._api.write(bucket=self.settings.bucket, org=self.settings.org, record=body,
                        write_precision=precision)

    def close(self) -> None:
        self._api.close()
        self._client.close()
