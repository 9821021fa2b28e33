"""MQTT agents of simulated substations: each plays a :class:`grid_sim.substation.SubstationSim` on the broker.

``agent`` is the MQTT edge of one substation; ``scenario_agents`` plays a replay scenario's substations;
``python -m substation_agents`` runs one agent per configured substation in one process.
"""
