"""The grid on a NATS cluster (issue 12): nats-server with JetStream and its MQTT 3.1.1 listener.

* :mod:`broker.nats.config` renders each node's config (routes, JetStream, MQTT, optional TLS and monitoring) and
  the shared accounts file whose permissions are derived from ``broker/roles.py`` (the one role table);
* :mod:`broker.nats.cluster` runs a local N-node cluster on free loopback ports (:class:`LocalCluster`: tests,
  benchmarks, ``./gridctl run --cluster``);
* ``python -m broker.nats`` writes the files for a deployment or runs a local cluster in the foreground.
"""
