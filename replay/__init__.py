"""Replay: run scenarios (a day of EVs, base load and grid events) against the balancing policies and
measure how well they balance. ``python -m replay --help``; scenarios in ``grid_sim/scenarios/``."""
