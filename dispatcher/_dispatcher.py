"""``Dispatcher``: what the host calls, and the owner of everything a call needs.

It starts the providers and attaches the plugins, resolves ``plugin.method`` through the
routing table (``dispatcher._routes``) built once at start, fixes each call's deadline,
and hands the invocation to the method's policy chain; leaving it stops all of that.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from dispatcher._routes import Route, RouteTable, checked_timeout
from dispatcher.config import DEFAULT_TIMEOUT_MS, Manifest, PluginSpec, load_manifest
from dispatcher.fleet import FleetRuntime
from dispatcher.fleet.breaker import StateListener as CircuitListener
from dispatcher.policies import PolicyRuntime
from linchkit_plugin.errors import (
    DeadlineExceeded,
)
from providers import provider_classes
from providers.base import Health, Provider
from providers.invocation import Invocation, new_request_id
from providers.target import TargetConfig

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["Call", "Dispatcher", "TargetHealth"]

log = logging.getLogger("dispatcher")

EventHandler = Callable[[str, Any], Any]


@dataclass(frozen=True, slots=True)
class Call:
    """One call for ``Dispatcher.call_many``; a plain ``(plugin, method, params)`` tuple works too."""

    plugin: str
    method: str
    params: Any = None
    caller: str | None = None
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class TargetHealth:
    plugin: str
    version: str
    target: str
    health: Health
    #: The state of the target's circuit breaker, when one is configured.
    circuit: str | None = None
    #: For an instance of a fleet: the fleet (its target's description) and the
    #: instance's state in it (``healthy``, ``ejected``, ``down``); None otherwise.
    fleet: str | None = None
    state: str | None = None


class Dispatcher:
    """Calls plugin methods on their function targets.

    Use it as an async context manager: entering starts every provider and plugin,
    leaving stops them and closes every client, task and process they opened.
    """

    def __init__(
        self,
        manifest: Manifest[Any],
        *,
        providers: dict[str, Provider[Any]] | None = None,
    ) -> None:
        self.manifest = manifest
        self._clock: Callable[[], float] = time.monotonic  # the running loop's, from start()
        self.policies: PolicyRuntime | None = None
        self.fleets: FleetRuntime | None = None
        self._circuit_listeners: list[CircuitListener] = []
        self._handlers: dict[tuple[str, str], list[EventHandler]] = defaultdict(list)
        self._providers = providers if providers is not None else self._make_providers()
        for provider in self._providers.values():
            provider.event_sink = self._emit
            provider.use_egress(manifest.egress)
        self._event_tasks: set[asyncio.Task[Any]] = set()
        self._routes = RouteTable()
        self._attached: list[tuple[Provider[Any], PluginSpec[Any], TargetConfig]] = []
        self._started_providers: list[Provider[Any]] = []
        self._state = "new"

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **options: Any) -> Self:
        """A dispatcher for the manifest at ``path`` (YAML or TOML)."""
        return cls(load_manifest(path), **options)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"a dispatcher starts once; this one is {self._state}")
        self._state = "starting"
        self._clock = asyncio.get_running_loop().time
        self.fleets = FleetRuntime(self._clock)
        self.policies = PolicyRuntime(self._clock, self.fleets)
        self.policies.breaker_listeners.extend(self._circuit_listeners)
        try:
            for provider in self._providers.values():
                await provider.start()
                self._started_providers.append(provider)
            for plugin in self.manifest.plugins:
                await self._attach(plugin)
            self.fleets.start()
        except BaseException:
            await self.aclose()
            raise
        self._state = "running"

    async def aclose(self) -> None:
        """Stop every plugin (in reverse start order), then close every provider."""
        if self._state == "closed":
            return
        self._state = "closed"
        self._routes.clear()
        if self.fleets is not None:
            await self.fleets.aclose()  # health checks end before the providers close
        if self.policies is not None:
            await self.policies.aclose()  # batches still queued go out before targets detach
        for task in list(self._event_tasks):
            task.cancel()
        await asyncio.gather(*self._event_tasks, return_exceptions=True)
        while self._attached:
            provider, plugin, target = self._attached.pop()
            try:
                await provider.detach(plugin, target)
            except Exception:
                log.exception("detaching %s from %s failed", plugin.key, target.describe())
        while self._started_providers:
            provider = self._started_providers.pop()
            try:
                await provider.aclose()
            except Exception:
                log.exception("closing provider %s failed", provider.name)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- calls -----------------------------------------------------------------------

    async def call(
        self,
        plugin: str,
        method: str,
        params: Any = None,
        *,
        version: str | None = None,
        caller: str | None = None,
        timeout: float | None = None,
        traceparent: str | None = None,
        idempotency_key: str | None = None,
        request_id: str | None = None,
    ) -> Any:
        """Call ``plugin.method`` with ``params`` and return its result.

        ``timeout`` (seconds) overrides the method's ``timeout_ms`` and bounds the whole
        call. Raises a ``DispatchError`` subclass on any failure.
        """
        route = self._routes.find(plugin, method, version, self._state)
        invocation = self._invocation(
            route, params, timeout, request_id, caller, traceparent, idempotency_key
        )
        return await route.invoke(invocation)

    def _invocation(
        self,
        route: Route,
        params: Any,
        timeout: float | None,
        request_id: str | None,
        caller: str | None,
        traceparent: str | None,
        idempotency_key: str | None,
    ) -> Invocation:
        """Check the params and fix the deadline of one call of ``route``."""
        if params is None:
            params = {}
        if route.validate is not None:
            route.validate(params)
        budget = route.timeout if timeout is None else checked_timeout(timeout, route.name)
        # Positional: keyword arguments cost a third more on this, the per-call hot path.
        return Invocation(
            route.plugin,  # plugin
            route.version,  # version
            route.method,  # method
            params,  # params
            self._clock() + budget,  # deadline
            request_id or new_request_id(),  # request_id
            caller,  # caller
            traceparent,  # traceparent
            idempotency_key,  # idempotency_key
        )

    async def call_many(
        self,
        calls: Iterable[Call | tuple[str, str] | tuple[str, str, Any]],
        *,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Run several calls concurrently; results in the order of ``calls``.

        Every call runs to its end. Then, unless ``return_exceptions``, the first error
        (in call order) is raised; with it, errors take the place of their results.
        """
        pending = [self._one(item) for item in calls]
        results = await asyncio.gather(*pending, return_exceptions=True)
        if not return_exceptions:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return results

    def _one(self, item: Call | tuple[str, str] | tuple[str, str, Any]) -> Any:
        if isinstance(item, Call):
            return self.call(
                item.plugin, item.method, item.params, caller=item.caller, timeout=item.timeout
            )
        return self.call(*item)

    async def stream(
        self,
        plugin: str,
        method: str,
        params: Any = None,
        *,
        version: str | None = None,
        caller: str | None = None,
        timeout: float | None = None,
        traceparent: str | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[Any]:
        """Call a streaming method; yields its chunks as they arrive.

        ``timeout`` bounds the whole stream (the target's deadline). The method's rate
        limits, bulkhead and breaker apply (``dispatcher.policies.gate``); its cache,
        batching and retries do not. A provider without streaming raises ``ProviderError``;
        a failure mid-stream raises its ``DispatchError`` after the chunks already yielded.
        """
        route = self._routes.find(plugin, method, version, self._state)
        invocation = self._invocation(route, params, timeout, request_id, caller, traceparent, None)
        chunks = route.gate.stream(invocation, route.stream)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    async def publish(
        self,
        plugin: str,
        event: str,
        data: Any = None,
        *,
        version: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_MS / 1000,
    ) -> None:
        """Send the host event ``event`` to ``plugin`` (every target it runs on).

        Each target's own rate limits, bulkhead and breaker apply (those scoped to the
        target: an event belongs to no method), and ``timeout`` bounds the whole publish.
        """
        wanted = self._routes.version_of(plugin, version, self._state)
        timeout = checked_timeout(timeout, f"publishing {event!r} to {plugin}")
        invocation = Invocation(
            plugin, wanted, event, data, self._clock() + timeout, new_request_id()
        )
        try:
            async with asyncio.timeout_at(invocation.deadline):
                for spec in self.manifest.plugins:
                    if spec.id == plugin and spec.version == wanted:
                        for target in spec.targets():
                            for instance in target.instance_targets():
                                await self._publish_to(instance, invocation, event, data)
        except TimeoutError:
            raise DeadlineExceeded(
                f"publishing {event!r} to {plugin} took longer than {timeout:g} s"
            ) from None

    async def _publish_to(
        self, target: TargetConfig, invocation: Invocation, event: str, data: Any
    ) -> None:
        assert self.policies is not None
        send_event = self._providers[target.provider].send_event
        await self.policies.event_gate(target).send(
            invocation, lambda: send_event(target, event, data)
        )

    # -- introspection -----------------------------------------------------------------

    async def health(self, *, timeout: float = 5.0) -> list[TargetHealth]:
        """Probe every target of every plugin, concurrently; a fleet, every instance."""
        checks: list[tuple[PluginSpec[Any], TargetConfig, TargetConfig]] = [
            (plugin, target, instance)
            for plugin in self.manifest.plugins
            for target in plugin.targets()
            for instance in target.instance_targets()
        ]
        reports = await asyncio.gather(*(self._probe(each, timeout) for _, _, each in checks))
        return [
            TargetHealth(
                plugin.id,
                plugin.version,
                instance.describe(),
                report,
                self._circuit_state(instance),
                *self._fleet_state(target, instance),
            )
            for (plugin, target, instance), report in zip(checks, reports, strict=True)
        ]

    def _fleet_state(
        self, target: TargetConfig, instance: TargetConfig
    ) -> tuple[str | None, str | None]:
        fleet = self.fleets.get(target) if self.fleets is not None else None
        if fleet is None:
            return None, None
        for member in fleet.instances:
            if member.key == instance.key:
                return fleet.name, str(fleet.state_of(member))
        return fleet.name, None

    def _circuit_state(self, target: TargetConfig) -> str | None:
        breaker = self.policies.breaker_of(target) if self.policies is not None else None
        return str(breaker.state) if breaker is not None else None

    def invalidate(self, plugin: str | None = None, method: str | None = None) -> int:
        """Drop cached results: of one plugin, one of its methods, or everything."""
        return self.policies.invalidate(plugin, method) if self.policies is not None else 0

    def stats(self) -> dict[str, Any]:
        """Cache, breaker, batch and retry-budget counters."""
        return self.policies.stats() if self.policies is not None else {}

    def on_circuit_change(self, listener: CircuitListener) -> None:
        """Call ``listener(breaker, old_state, new_state)`` on every breaker transition."""
        self._circuit_listeners.append(listener)
        if self.policies is not None:
            self.policies.breaker_listeners.append(listener)

    def on(self, plugin: str, event: str, handler: EventHandler) -> None:
        """Run ``handler(event, data)`` whenever ``plugin`` emits ``event`` (``"*"``: any event)."""
        self._handlers[(plugin, event)].append(handler)

    @property
    def providers(self) -> dict[str, Provider[Any]]:
        return dict(self._providers)

    def __repr__(self) -> str:
        plugins = ", ".join(plugin.key for plugin in self.manifest.plugins)
        return f"<Dispatcher {self._state} plugins=[{plugins}]>"

    # -- internals -----------------------------------------------------------------------

    async def _attach(self, plugin: PluginSpec[Any]) -> None:
        for target in plugin.targets():
            provider = self._providers[target.provider]
            for instance in target.instance_targets():
                await provider.attach(plugin, instance)
                self._attached.append((provider, plugin, instance))
        assert self.policies is not None
        self._routes.add(plugin, {name: self._new_route(plugin, name) for name in plugin.methods})

    def _provider_of(self, plugin: PluginSpec[Any], method: str) -> Provider[Any]:
        return self._providers[plugin.target_of(method).provider]

    def _new_route(self, plugin: PluginSpec[Any], method: str) -> Route:
        assert self.policies is not None
        provider = self._provider_of(plugin, method)
        invoke = self.policies.chain(plugin, method, provider, plugin.target_of(method))
        return Route(plugin, method, provider, invoke, self.policies.gate(plugin, method))

    async def _probe(self, target: TargetConfig, timeout: float) -> Health:
        provider = self._providers[target.provider]
        try:
            async with asyncio.timeout(timeout):
                return await provider.health(target)
        except TimeoutError:
            return Health("not_serving", f"no health answer within {timeout:.1f} s")
        except Exception as error:
            return Health("unknown", f"health probe failed: {error!r}")

    def _make_providers(self) -> dict[str, Provider[Any]]:
        used = {target.provider for plugin in self.manifest.plugins for target in plugin.targets()}
        classes = provider_classes()
        providers: dict[str, Provider[Any]] = {}
        for name in sorted(used):
            providers[name] = classes[name]()
        return providers

    def _emit(self, plugin: str, event: str, data: Any) -> None:
        for handler in (
            *self._handlers.get((plugin, event), ()),
            *self._handlers.get((plugin, "*"), ()),
        ):
            try:
                outcome = handler(event, data)
                if asyncio.iscoroutine(outcome):
                    task = asyncio.get_running_loop().create_task(outcome)
                    self._event_tasks.add(task)
                    task.add_done_callback(self._event_tasks.discard)
            except Exception:
                log.exception("event handler for %s/%s failed", plugin, event)
