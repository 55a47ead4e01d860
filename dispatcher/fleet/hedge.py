"""The seam between hedging (``dispatcher.policies.hedge``) and ``FleetStep``.

A hedged call runs its attempts as tasks, each in a copy of the caller's context in which
``HEDGE_TRIED`` holds one list shared by all of them. ``FleetStep`` avoids the instances
in that list when it picks one, and appends every instance it sends to (failovers too),
so a hedge never goes where another attempt of the same call already went. Outside a
hedged call it is None and ``FleetStep`` behaves as without hedging.
"""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["HEDGE_TRIED"]

#: Indices (``Instance.index``) of the instances the attempts of this hedged call went to.
HEDGE_TRIED: ContextVar[list[int] | None] = ContextVar("dispatcher_fleet_hedge_tried", default=None)
