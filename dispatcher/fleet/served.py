"""The seam between the audit log and ``FleetStep``: which instance served a call.

While the dispatcher audits, each call runs with ``SERVED_BY`` holding a list of its
own; ``FleetStep`` appends every instance it sends an attempt to (retries, failovers and
hedges too: a hedge's task copies the context, and with it the same list), so the last
one is the instance that answered or failed last. Outside an audited call it is None
and costs ``FleetStep`` one context-variable read per attempt. A batched call's attempt
runs in the batcher's task, not the caller's: its record names the fleet instead.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dispatcher.fleet.instances import Instance

__all__ = ["SERVED_BY"]

SERVED_BY: ContextVar[list[Instance] | None] = ContextVar(
    "dispatcher_fleet_served_by", default=None
)
