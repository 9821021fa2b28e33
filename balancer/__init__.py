"""The balancer: assigns, queues or rejects EV charge requests so no substation exceeds its capacity.

``balancer.core`` is the pure allocation logic (no I/O, time passed in); ``balancer.service`` is the
thin MQTT adapter around it; ``python -m balancer`` runs it.
"""
