"""Runtime plumbing shared by every service: settings, structured logs, MQTT transports, lifecycle.

Kept apart from ``grid_protocol`` (the contract) and from each service's domain logic so the
domain code never imports an MQTT or logging library.
"""
