"""The balancer: assigns, queues or rejects EV charge requests so no substation exceeds its capacity.

``balancer.core`` is the pure allocation logic (no I/O, time passed in); ``balancer.service`` is the
thin MQTT adapter around it; ``python -m balancer`` runs it.

The core and the service's hot path run compiled by mypyc when a current build exists (``grid_runtime.native``;
``./gridctl setup`` builds it, ``GRID_NATIVE`` chooses): ``NATIVE.status`` says which.
"""

import sys

from grid_runtime.native import NativeBuild

#: Compiled to C: the core's packages (all but the pydantic settings model) and the service's hot path (the MQTT
#: adapter and its admission control), mounted here, before any is imported; the build is current while nothing in
#: this package or in the packages it was type-checked against changed.
NATIVE = NativeBuild(sys.modules[__name__], ("balancer.core", "balancer.core.policies"),
                     modules=("balancer.service", "balancer.admission"), interpreted=("balancer.core.config",),
                     depends=("grid_protocol", "grid_runtime"))
NATIVE.mount()
