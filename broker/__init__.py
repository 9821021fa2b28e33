"""The MQTT broker of the Smart Grid Load Balancer: Mosquitto configuration, accounts and ACL.

* :mod:`broker.accounts` builds the password file (Mosquitto ``$7$`` hashes written in Python) and the
  ACL (roles + per-substation blocks) for a set of accounts; ``python -m broker.accounts`` is the CLI.
* :mod:`broker.local` renders ``mosquitto.conf.in`` and runs a private Mosquitto on a loopback port for
  local runs, tests and benchmarks (:class:`broker.local.LocalBroker`).

See ``broker/README.md`` for the roles, the ACL design and the limits.
"""
