"""How a method's route is put together, once, when its plugin is attached or reloaded.

From the inside out::

    target ◄─ the method's policy chain (dispatcher.policies: cache … fleet)
           ◄─ its fallback (another plugin, through the routing table)
           ◄─ telemetry (outermost: it sees what the caller gets)

and beside ``invoke``: the chain of a call carrying an idempotency key (``once``), the
method's gate for streams and events (rate limits, bulkhead, breaker), and the stream
opener, wrapped by telemetry too. The order is the whole job of this module: a fallback
inside telemetry is counted once, as the call its caller made; a fallback outside the
policies gets the fallback plugin's own policies, not these.

Fallbacks are another part of the core (``dispatcher._fallback``), so they come in as the
function that wraps a chain, not as a module this one imports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dispatcher._routes import Route, RouteTable
from dispatcher.config import PluginSpec
from dispatcher.policies import PolicyRuntime, Step
from dispatcher.telemetry import TelemetryRuntime
from providers.base import Provider

__all__ = ["RouteBuilder", "WrapFallback"]

#: ``Fallbacks.wrap``: a method's chain with its fallback around it, if it has one.
WrapFallback = Callable[[PluginSpec[Any], str, Step, RouteTable], Step]


class RouteBuilder:
    """Builds the routes of a plugin's methods from the dispatcher's running parts."""

    __slots__ = ("policies", "providers", "telemetry", "wrap_fallback")

    def __init__(
        self,
        policies: PolicyRuntime,
        providers: dict[str, Provider[Any]],
        wrap_fallback: WrapFallback,
        telemetry: TelemetryRuntime | None,
    ) -> None:
        self.policies = policies
        self.providers = providers
        self.wrap_fallback = wrap_fallback
        self.telemetry = telemetry

    def routes_of(self, plugin: PluginSpec[Any], table: RouteTable) -> dict[str, Route]:
        """A route for every method ``plugin`` lists; ``table`` is where its fallbacks
        find the plugins they fall back to."""
        return {method: self.route(plugin, method, table) for method in plugin.methods}

    def route(self, plugin: PluginSpec[Any], method: str, table: RouteTable) -> Route:
        policies, telemetry = self.policies, self.telemetry
        target = plugin.target_of(method)
        provider = self.providers[target.provider]
        invoke = policies.chain(plugin, method, provider, target)
        invoke = self.wrap_fallback(plugin, method, invoke, table)
        if telemetry is not None:
            invoke = telemetry.around_call(
                plugin.id,
                plugin.version,
                method,
                target.provider,
                plugin.policies_of(method).may_cache,
                invoke,
            )
        gate = policies.gate(plugin, method)
        once = policies.once(plugin, method, invoke)
        route = Route(plugin, method, provider, invoke, once, gate, policies.fleets.get(target))
        if plugin.policies_of(method).fallback is not None:  # it may reach another plugin
            route.reaches = None
        if telemetry is not None:
            route.open_stream = telemetry.around_stream(
                plugin.id, plugin.version, method, target.provider, route.open_stream
            )
        return route
