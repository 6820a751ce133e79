"""Services and state rules of Embervm: what the control API and the proxy call.

Layering inside the package: ``ids``/``clock``/``paging``/``limits`` (data and small rules) ←
``seams`` (the Protocols real work goes through: ``HostBackend``, ``ImageBuilder``, log
sources, ``TokenIssuer``; the values they carry are in ``embervm.contracts``) ← ``builds``
(image builds in the background) ← ``supervisor`` (background transitions) ← ``lifecycle``
(idle/lifetime timers, auto-resume, the proxy's view) ← ``images``/``microvms`` (the
operations) ← ``operations`` (``Operations.invoke``, the API's one entry point). Fakes of
the seams live with the tests (``tests/framework/fake_core.py``). Core writes no SQL
(``embervm.store``) and knows no HTTP.
"""

from embervm.core.caller import Caller
from embervm.core.clock import Clock, SystemClock
from embervm.core.lifecycle import Lifecycle, ResolvedVm
from embervm.core.limits import CoreLimits, RateLimit, host_memory_budget_mib
from embervm.core.operations import Operations
from embervm.core.seams import (
    AppLogSource,
    BuildLogSource,
    HostBackend,
    ImageBuilder,
    TokenIssuer,
)
from embervm.core.supervisor import Supervisor

__all__ = [
    "AppLogSource",
    "BuildLogSource",
    "Caller",
    "Clock",
    "CoreLimits",
    "HostBackend",
    "ImageBuilder",
    "Lifecycle",
    "Operations",
    "RateLimit",
    "ResolvedVm",
    "Supervisor",
    "SystemClock",
    "TokenIssuer",
    "host_memory_budget_mib",
]
