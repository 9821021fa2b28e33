"""The balancer: assigns, queues or rejects EV charge requests so no substation exceeds its capacity.

``balancer.core`` is the pure allocation logic (no I/O, time passed in); ``balancer.service`` is the
thin MQTT adapter around it; ``python -m balancer`` runs it.

The core runs compiled by mypyc when a current build exists (``grid_runtime.native``; ``./gridctl setup`` builds
it, ``GRID_NATIVE`` chooses): ``NATIVE.status`` says which.
"""

import sys

from grid_runtime.native import NativeBuild

#: The core's packages compiled to C (all but the pydantic settings model), mounted here, before any is imported;
#: the build is current while nothing in this package or in the contract it was type-checked against changed.
NATIVE = NativeBuild(sys.modules[__name__], ("balancer.core", "balancer.core.policies"),
                     interpreted=("balancer.core.config",), depends=("grid_protocol",))
NATIVE.mount()
