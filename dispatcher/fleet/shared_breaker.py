"""A circuit breaker whose state every replica shares (``state: redis``).

One breaker guards one target instance: a single-instance target (``SharedBreakerStep`` in
``dispatcher.policies.shared``) or one instance of a fleet (``FleetStep``). Its counters
and state live in one hash of the store, keyed by a digest of the instance target's
``key``: the instance's own identity (its address, its settings), the same in every
replica, unlike its index in a fleet, which depends on the order instances joined.

The transitions are those of ``CircuitBreaker`` (``breaker``), run by one server-side
script per admit and outcome, so one replica's failures open the circuit for all and
half-open probes are counted across all. So that an admit is not a round trip per call, a
replica trusts its last view of a *closed* breaker for ``sync`` seconds, and every
transition is pushed to every replica, which drops its view at once. Successes are
written only when they change something (failures were counted, a probe).

When the store cannot answer: ``fail_open`` uses ``local`` (this replica's own breaker,
which then decides alone), ``fail_closed`` raises ``StateUnavailable``. A call admitted
locally is recorded locally: a ticket says which breaker admitted it.

What this replica shows of the breaker (``shown``: metrics, ``dispatcher top``,
``dispatcher health``, the ``dispatcher.breaker`` log) is the shared state as it last
learnt it (``SharedStore.breaker_watch``: its own operations' answers, and a read after
every transition another replica pushes), or the local breaker's while that one decides.
A transition this replica learns of, whichever replica made it, is logged and told to the
state listeners (``dispatcher_breaker_transitions_total``) once. What it learns may arrive
in another order than the store answered (a read sent before an operation, answered
after it): each answer carries the shared state's generation, and one older than what
this replica holds is ignored, so a late answer never shows a state the breaker has left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from dispatcher.config import BreakerPolicy
from dispatcher.fleet.breaker import BreakerState, CircuitBreaker
from dispatcher.state import BreakerPolicyArgs, SharedStore, StateBackend, StateUnavailable, digest
from linchkit_plugin.errors import CircuitOpen, DispatchError
from providers.invocation import Invocation

__all__ = ["LOCAL", "PROBE", "QUIET", "SharedBreaker"]

#: The bits of a ticket (what ``admit`` returns): the call is a probe; a success of it
#: changes nothing worth a write; the local breaker admitted it (the store could not).
PROBE = 1
QUIET = 2
LOCAL = 4

#: Bound of a record written after the call's own deadline (the backend's operation
#: timeout bounds it further).
LATE_RECORD_SECONDS = 60.0

log = logging.getLogger("dispatcher.breaker")

_STATES = {state.value: state for state in BreakerState}


class SharedBreaker:
    """The breaker of one target instance, shared by every replica naming the same store."""

    __slots__ = (
        "args",
        "backend",
        "clock",
        "key",
        "local",
        "local_decides",
        "name",
        "seen",
        "seen_failures",
        "seen_generation",
        "store",
        "sync",
    )

    def __init__(
        self,
        local: CircuitBreaker,
        key: str,
        policy: BreakerPolicy,
        backend: StateBackend,
        sync: float,
        clock: Callable[[], float],
    ) -> None:
        assert backend.store is not None
        self.local = local
        self.name = local.name
        self.key = digest(key)
        self.args = _args_of(policy)
        self.backend = backend
        self.store: SharedStore = backend.store
        self.sync = sync
        self.clock = clock
        #: The shared state as this replica last learnt it (None: not yet).
        self.seen: BreakerState | None = None
        self.seen_failures = 0
        #: The generation of ``seen`` (-1: nothing learnt; 0: a store without generations).
        self.seen_generation = -1
        #: The store did not answer the last admit (fail_open): the local breaker decides.
        self.local_decides = False
        self.store.breaker_watch(self.key, self._saw)

    def configure(self, policy: BreakerPolicy) -> None:
        """New settings (a reload changed them): the store applies them from this
        replica's next operation on (its local breaker is configured apart)."""
        self.args = _args_of(policy)

    def close(self) -> None:
        """No route calls through this breaker any more: the store stops watching it (a
        call still in flight through it goes on, reading the store as it admits)."""
        self.store.breaker_unwatch(self.key)

    async def admit(self, invocation: Invocation) -> int:
        """A ticket (``PROBE``, ``QUIET``, ``LOCAL`` bits) or ``CircuitOpen``; with the
        store unavailable, ``StateUnavailable`` (fail_closed) or the local breaker's say."""
        seen = self.store.breaker_view(self.key)
        if seen is not None:
            view, at = seen
            if view.state == "closed" and self.clock() - at < self.sync:
                return QUIET if view.failures == 0 else 0
        try:
            view = await self.store.breaker_admit(self.key, self.args, invocation.deadline)
        except StateUnavailable as error:
            if not self.backend.fail_open:
                raise
            self.backend.fell_back(f"the breaker of {self.name}", error)
            self.local_decides = True
            return LOCAL | (PROBE if self.local.admit() else 0)
        self.local_decides = False
        if not view.admitted:
            why = "open" if view.state == "open" else "half-open and its probes are in flight"
            raise CircuitOpen(
                f"circuit of {self.name} is {why} (shared by all replicas)",
                retry_after=view.retry_after,
            )
        quiet = view.state == "closed" and view.failures == 0
        return (PROBE if view.probe else 0) | (QUIET if quiet else 0)

    async def record(self, ticket: int, failed: bool, invocation: Invocation) -> None:
        """The call admitted with ``ticket`` ended: a health failure (``failed``) or not."""
        probe = bool(ticket & PROBE)
        if ticket & LOCAL:
            (self.local.record_failure if failed else self.local.record_success)(probe)
        elif failed or probe or not ticket & QUIET:
            await self._record("failure" if failed else "success", probe, invocation)

    def record_nothing(self, ticket: int) -> None:
        """The call ended without telling anything (cancelled): free its probe slot,
        without making anyone wait for it."""
        if ticket & LOCAL:
            self.local.record_nothing(bool(ticket & PROBE))
        elif ticket & PROBE:
            self.store.spawn(self._record_now("nothing", True, None), "breaker record")

    async def _record(self, outcome: str, probe: bool, invocation: Invocation) -> None:
        """Record within the call's time when there is some, else without waiting: the
        outcome is in hand, recording it must not push the call past its deadline."""
        if invocation.remaining() > 0:
            try:
                await self._record_now(outcome, probe, invocation.deadline)
            except StateUnavailable as error:
                self.backend.fell_back(f"the breaker of {self.name}", error)
                self._record_locally(outcome)
            except DispatchError:  # the deadline came first: finish it in the background
                self.store.spawn(self._record_now(outcome, probe, None), "breaker record")
        else:
            self.store.spawn(self._record_now(outcome, probe, None), "breaker record")

    async def _record_now(self, outcome: str, probe: bool, deadline: float | None) -> None:
        if deadline is None:
            deadline = self.clock() + LATE_RECORD_SECONDS
        await self.store.breaker_record(self.key, self.args, outcome, probe, deadline)

    def _record_locally(self, outcome: str) -> None:
        # The shared admit said nothing of the local breaker's probes: count no probe.
        if outcome == "failure":
            self.local.record_failure(False)
        else:
            self.local.record_success(False)

    def _saw(self, state: str, failures: int, generation: int) -> None:
        """This replica learnt where the shared breaker stands (``breaker_watch``): a
        change from what it knew is a transition, logged and told to the listeners once,
        whichever replica made it. The first sight of a breaker not closed counts as
        leaving ``closed``, the state every breaker starts in. An answer of an older
        ``generation`` than the one held arrived late: the breaker has left that state,
        so it is not learnt (it would count a transition back and one forth again). One of
        the same generation is the same state; its failure count is taken as told."""
        new = _STATES.get(state)
        if new is None or generation < self.seen_generation:  # garbled, or stale
            return
        self.seen_generation = generation
        self.seen_failures = failures
        old = self.seen
        if new is old:
            return
        self.seen = new
        if old is None:
            if new is BreakerState.CLOSED:
                return
            old = BreakerState.CLOSED
        log.info("circuit of %s: %s -> %s (shared by all replicas)", self.name, old, new)
        for listener in self.local.listeners:
            listener(self, old, new)

    def shown(self) -> tuple[str, int]:
        """The state and failure count this replica shows: the shared breaker's as last
        learnt, or the local one's while it decides (or before anything was learnt)."""
        if self.local_decides or self.seen is None:
            return str(self.local.state), self.local.failures
        return str(self.seen), self.seen_failures

    @property
    def state(self) -> BreakerState:
        """The state this replica shows (``shown``)."""
        return BreakerState(self.shown()[0])

    def __repr__(self) -> str:
        return (
            f"<SharedBreaker {self.name} seen={self.seen} generation={self.seen_generation}"
            f" local_decides={self.local_decides}"
            f" local={self.local!r}>"
        )


def _args_of(policy: BreakerPolicy) -> BreakerPolicyArgs:
    return BreakerPolicyArgs(
        policy.fail_max,
        policy.reset_timeout_ms / 1000,
        policy.half_open_max_calls,
        policy.success_threshold,
    )
