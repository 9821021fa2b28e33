"""Telemetry recorder: every grid message worth keeping, written to InfluxDB (v2 write API).

Subscribes read-only (as ``recorder``) to telemetry, status, the balancer's retained state and queue,
EV assignments and session events; turns each message into points of the schema in
:mod:`monitoring.recorder.schema`; buffers them (bounded) and writes them in batches from a worker
thread so a slow or absent database never stalls or crashes the MQTT side. See ``docs/recorder.md``.
"""
