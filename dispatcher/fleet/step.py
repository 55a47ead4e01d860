"""The step a fleet target's chain ends with: pick an instance, guard it, invoke, record.

    retry ─► FleetStep ─► pick (balancer, states) ─► breaker of that instance ─► provider

Each attempt goes to one instance; its breaker (one per instance, keyed by the instance
target's ``key``, made when a method that configures breakers first calls it) admits it,
and its outcome feeds the breaker and the outlier detector. With ``state: redis`` the
breaker is the instance's ``SharedBreaker`` (``shared_breaker``): one replica's failures
against an instance open its circuit for every replica, whose calls then go to the
other instances (a refused admit fails over, as below). A fleet with no instance
(its sources have listed none yet) fails the call with ``TargetUnavailable`` naming them.

**Failover.** An attempt that provably never reached the plugin moves to another
instance, for any method, idempotent or not, as long as the deadline allows and an
instance is left that this call has not tried: the instance's breaker refused it
(``CircuitOpen``), or the provider could not connect (``details["stage"] == "connect"``,
set by the provider when no byte of the request went out). Anything else may have
reached the plugin: the error goes up, and only the retry policy (idempotent methods)
tries again. Its next attempt avoids the instance that just failed it: the step leaves
``(invocation, instance)`` in a context variable, which the retry step's next call of
this step, in the same task, reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from functools import partial
from typing import Any

from dispatcher.fleet.breaker import CircuitBreaker, guard_batch, is_health_failure
from dispatcher.fleet.fleet import Fleet
from dispatcher.fleet.hedge import HEDGE_TRIED
from dispatcher.fleet.instances import Instance
from dispatcher.fleet.served import SERVED_BY
from dispatcher.fleet.shared_breaker import SharedBreaker
from linchkit_plugin.errors import CircuitOpen, DispatchError, TargetUnavailable
from providers.invocation import Invocation, Outcome
from providers.target import TargetConfig

__all__ = ["BreakerFor", "FleetStep", "SharedBreakerFor", "never_sent"]

Invoke = Callable[[TargetConfig, Invocation], Awaitable[Any]]
#: Makes (or finds) the breaker of an instance; None: the method configures no breaker.
BreakerFor = Callable[[Instance], CircuitBreaker] | None
#: Makes (or finds) the shared breaker of an instance (``state: redis``); None: local only.
SharedBreakerFor = Callable[[Instance], SharedBreaker] | None
InvokeBatch = Callable[[TargetConfig, Sequence[Invocation]], Awaitable[list[Outcome[Any]]]]

#: The instance that last failed an attempt of an invocation that may be retried.
_FAILED_ON: ContextVar[tuple[Invocation, Instance] | None] = ContextVar(
    "dispatcher_fleet_failed_on", default=None
)


class _NeverSent(Exception):
    """An attempt under a shared breaker never reached the plugin: try another instance."""

    def __init__(self, error: DispatchError) -> None:
        super().__init__(error.message)
        self.error = error


def never_sent(error: DispatchError) -> bool:
    """True when ``error`` proves the attempt never reached the plugin."""
    return isinstance(error, CircuitOpen) or error.details.get("stage") == "connect"


class FleetStep:
    """The end of the chain of one method on a fleet target."""

    __slots__ = ("breaker_for", "fleet", "invoke", "shared_for")

    def __init__(
        self,
        fleet: Fleet,
        invoke: Invoke,
        breaker_for: BreakerFor = None,
        shared_for: SharedBreakerFor = None,
    ) -> None:
        self.fleet = fleet
        self.invoke = invoke
        self.breaker_for = breaker_for
        self.shared_for = shared_for
        # Made now, so reports show them before the first call; and asked again of the
        # policies for instances that have them already, which gives them this chain's
        # settings when a reload changed them (``PolicyRuntime.building``).
        for instance in fleet.instances:
            if breaker_for is not None:
                instance.breaker = breaker_for(instance)
            if shared_for is not None:
                instance.shared_breaker = shared_for(instance)

    def _shared(self, instance: Instance) -> SharedBreaker | None:
        if self.shared_for is None:
            return None
        shared = instance.shared_breaker
        if shared is None:
            shared = instance.shared_breaker = self.shared_for(instance)
        return shared

    def _breaker(self, instance: Instance) -> CircuitBreaker | None:
        if self.breaker_for is None:
            return None
        breaker = instance.breaker
        if breaker is None:
            breaker = instance.breaker = self.breaker_for(instance)
        return breaker

    async def __call__(self, invocation: Invocation) -> Any:
        fleet = self.fleet
        failed_on = _FAILED_ON.get()
        hedged = tried = HEDGE_TRIED.get()  # an attempt of a hedged call: avoid the others'
        if failed_on is not None and failed_on[0] is invocation:  # a retry: go elsewhere
            tried = self._tried(tried, failed_on[1])
        instance = fleet.pick(tried)
        if instance is None:
            instance = self._only_one(tried)
        served = SERVED_BY.get()  # an audited call: its record names the instance
        while True:
            if hedged is not None:  # the call's other attempts avoid this one (failovers too)
                hedged.append(instance.index)
            if served is not None:
                served.append(instance)
            shared = self._shared(instance)
            if shared is not None:
                try:
                    ticket = await shared.admit(invocation)
                except CircuitOpen as refused:
                    tried = self._tried(tried, instance)
                    instance = self._failover(invocation, tried, refused)
                    continue
                try:
                    return await self._attempt_shared(instance, shared, ticket, invocation)
                except _NeverSent as never:
                    tried = self._tried(tried, instance)
                    instance = self._failover(invocation, tried, never.error)
                    continue
            breaker = self._breaker(instance)
            probe = False
            if breaker is not None:
                try:
                    probe = breaker.admit()
                except CircuitOpen as refused:
                    tried = self._tried(tried, instance)
                    instance = self._failover(invocation, tried, refused)
                    continue
            instance.in_flight += 1
            instance.calls += 1
            try:
                result = await self.invoke(instance.target, invocation)
            except DispatchError as error:
                instance.in_flight -= 1
                if is_health_failure(error):
                    fleet.record_failure(instance)
                    if breaker is not None:
                        breaker.record_failure(probe)
                else:
                    fleet.record_success(instance)
                    if breaker is not None:
                        breaker.record_success(probe)
                if never_sent(error):
                    tried = self._tried(tried, instance)
                    instance = self._failover(invocation, tried, error)
                    continue
                if error.retryable:
                    _FAILED_ON.set((invocation, instance))
                raise
            except BaseException:
                instance.in_flight -= 1
                if breaker is not None:
                    breaker.record_nothing(probe)
                raise
            instance.in_flight -= 1
            fleet.record_success(instance)
            if breaker is not None:
                breaker.record_success(probe)
            return result

    async def _attempt_shared(
        self, instance: Instance, shared: SharedBreaker, ticket: int, invocation: Invocation
    ) -> Any:
        """One attempt on ``instance``, admitted by its shared breaker with ``ticket``;
        ``_NeverSent`` when the attempt provably never reached the plugin (fail over)."""
        fleet = self.fleet
        instance.in_flight += 1
        instance.calls += 1
        try:
            result = await self.invoke(instance.target, invocation)
        except DispatchError as error:
            instance.in_flight -= 1
            failed = is_health_failure(error)
            (fleet.record_failure if failed else fleet.record_success)(instance)
            await shared.record(ticket, failed, invocation)
            if never_sent(error):
                raise _NeverSent(error) from error
            if error.retryable:
                _FAILED_ON.set((invocation, instance))
            raise
        except BaseException:
            instance.in_flight -= 1
            shared.record_nothing(ticket)
            raise
        instance.in_flight -= 1
        fleet.record_success(instance)
        await shared.record(ticket, False, invocation)
        return result

    def batch_sender(
        self, invoke_batch: InvokeBatch
    ) -> Callable[[Sequence[Invocation]], Awaitable[list[Outcome[Any]]]]:
        """What a batcher of this method sends a batch with: one instance per batch,
        guarded by its breaker, failing over like a single call."""

        async def send(invocations: Sequence[Invocation]) -> list[Outcome[Any]]:
            fleet = self.fleet
            tried: list[int] | None = None
            instance = fleet.pick()
            if instance is None:
                raise self._none_known()
            earliest = min(invocation.deadline for invocation in invocations)
            while True:
                breaker = self._breaker(instance)
                chosen = instance
                instance.in_flight += 1
                instance.calls += 1
                try:
                    if breaker is None:
                        outcomes = await invoke_batch(chosen.target, invocations)
                    else:
                        outcomes = await guard_batch(
                            breaker, partial(invoke_batch, chosen.target, invocations)
                        )
                except DispatchError as error:
                    if is_health_failure(error):
                        fleet.record_failure(chosen)
                    if never_sent(error):
                        tried = self._tried(tried, chosen)
                        instance = self._failover_by(earliest, tried, error)
                        continue
                    raise
                finally:
                    chosen.in_flight -= 1
                if outcomes and all(
                    o.error is not None and is_health_failure(o.error) for o in outcomes
                ):
                    fleet.record_failure(chosen)
                else:
                    fleet.record_success(chosen)
                return outcomes

        return send

    def _only_one(self, tried: list[int] | None) -> Instance:
        """What a call goes to when ``pick`` found nothing: the instance a retry wanted to
        avoid, when it is the only one left (better than failing), or the typed error."""
        instances = self.fleet.instances
        if tried and instances:
            return instances[0]
        raise self._none_known()

    def _none_known(self) -> TargetUnavailable:
        fleet = self.fleet
        return TargetUnavailable(
            f"{fleet.name} has no instance: {fleet.why_empty()}",
            details={"stage": "connect"},
        )

    @staticmethod
    def _tried(tried: list[int] | None, instance: Instance) -> list[int]:
        if tried is None:
            return [instance.index]
        tried.append(instance.index)
        return tried

    def _failover(self, invocation: Invocation, tried: list[int], error: DispatchError) -> Instance:
        return self._failover_by(invocation.deadline, tried, error)

    def _failover_by(self, deadline: float, tried: list[int], error: DispatchError) -> Instance:
        """Another instance for an attempt that never reached the plugin, or ``error``."""
        if asyncio.get_running_loop().time() >= deadline:
            raise error
        instance = self.fleet.pick(tried)
        if instance is None:
            raise error
        self.fleet.failovers += 1
        return instance

    def __repr__(self) -> str:
        return f"<FleetStep {self.fleet!r}>"
