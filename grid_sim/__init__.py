"""The simulated world, read by the fast replay, the substation agents and the EV fleet alike (pure, no I/O).

* :mod:`grid_sim.scenario` - the scenario file (grid, EV arrivals, events) and the EVs drawn from its seed;
  the shipped scenarios are in ``grid_sim/scenarios/``;
* :mod:`grid_sim.timeline` - what a scenario means over time (grid actions, capacity steps, base-load curves,
  scenario time <-> wall clock);
* :mod:`grid_sim.load_curve` - a substation's base load over a simulated day (daily shape + seeded noise);
* :mod:`grid_sim.substation` - one substation: capacity, base load and the EV sessions the balancer started.

It imports only the contract (``grid_protocol``): no service, transport or replay code, so every simulator
stands on it and none of them on another.
"""
