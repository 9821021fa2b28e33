"""Benchmarks: the balancer through a real Mosquitto, next to a raw echo through the same broker."""
