"""Simulated substations: base load over a simulated day, EV sessions started by the balancer, MQTT agents.

``load_curve`` and ``simulation`` are pure domain code (simulated time passed in); ``agent`` is the MQTT
edge; ``python -m substation_agents`` runs one agent per configured substation in one process.
"""
