"""Status API and live page: FastAPI over the MQTT contract (``python -m api``).

Everything it shows comes from MQTT (the balancer's retained substation and queue state, retained
statuses, live telemetry and assignments), so any number of replicas can run and a restarted one
answers at once from retained messages. Requests, releases and operator actions go to the balancer
over MQTT too, each for a caller whose bearer token may do it (``tokens.py``, ``security.py``). See
``docs/api.md``.
"""

VERSION = "0.1.0"
