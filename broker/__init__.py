"""The MQTT broker of the Smart Grid Load Balancer: Mosquitto configuration, accounts, roles and grants.

* :mod:`broker.roles` defines who may publish and subscribe what (one role per service, one per EV and per
  substation);
* :mod:`broker.accounts` the usernames and derived passwords; ``python -m broker.accounts`` writes a broker's
  accounts as the state file of Mosquitto's dynamic security plugin (:mod:`broker.dynsec`);
* :mod:`broker.provisioning` adds and removes accounts while the broker runs (the API's operator endpoints);
* :mod:`broker.local` renders ``mosquitto.conf.in`` and runs a private Mosquitto on a loopback port for
  local runs, tests and benchmarks (:class:`broker.local.LocalBroker`).

See ``broker/README.md`` for the roles, the design of the grants and the limits.
"""
