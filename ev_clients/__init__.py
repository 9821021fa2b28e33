"""Simulated EV fleet and load tester for the Smart Grid Load Balancer (MQTT).

* :mod:`ev_clients.ev` - one EV: its own connection, request/retry/charge/release;
* :mod:`ev_clients.fleet` - a fleet (arrivals at a rate) or a closed-loop load test;
* :mod:`ev_clients.stats` - latency percentiles, counts, throughput, the JSON report;
* :mod:`ev_clients.workload` - request mix, arrival process, EV id pool (pure, seeded);
* :mod:`ev_clients.settings` - ``EV_*`` settings; :mod:`ev_clients.cli` - ``python -m ev_clients``.
"""
