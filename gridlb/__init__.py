"""The ``gridlb`` command: one entry point for every service and for the local run."""
