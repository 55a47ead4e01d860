"""Fallbacks: when a call ends with one of the errors its method lists, the same method of
another plugin answers.

    Dispatcher.call ─► route ─► Fallback ─► the method's chain (cache … fleet) ─► target
                                   └─ error.type in `on` ─► the fallback plugin's route

It wraps a route's whole chain, at the dispatcher level rather than in a provider or a
policy step: the fallback is another plugin, with its own target, policies and (perhaps)
fallback, reached through the routing table exactly as ``Dispatcher.call`` would reach it,
params checked against its own schema. Its invocation keeps the call's deadline, request
id, caller and trace: it has what remains of the time, and nothing when less than a
millisecond does (the original error then). The manifest loader has checked that the
plugin and its method exist and that no fallbacks form a cycle
(``dispatcher.config.fallbacks``).

A call answered by its fallback is marked where calls are observed today: a log line at
``INFO`` on the ``dispatcher`` logger naming both plugins and the error, and counters in
``Dispatcher.stats()["fallbacks"]``. When the fallback fails too, its error is what the
caller gets, with ``details["fallback_from"]`` holding the original error (its wire form
and the plugin it came from) and the original as ``__cause__``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from dispatcher._routes import RouteTable
from dispatcher.config import FallbackPolicy, PluginSpec
from dispatcher.policies import Step
from linchkit_plugin.errors import DispatchError
from providers.invocation import Invocation

__all__ = ["Fallback", "Fallbacks"]

log = logging.getLogger("dispatcher")

#: The least time a fallback is started with. Deadlines travel in whole milliseconds
#: (the clients' timeouts, aiohttp's rounded down; the envelope's ``deadline_ms``, which a
#: plugin enforces), so a call that ended ``deadline_exceeded`` may still see up to a
#: millisecond left here: a fallback started with it could only fail again, in the
#: caller's face, as ``fallback_from``.
LEAST_FALLBACK_SECONDS = 0.001


class Fallback:
    """The chain of one method, and the plugin that answers when it fails as ``on`` says."""

    __slots__ = ("failed", "name", "next", "on", "policy", "routes", "unused", "used")

    def __init__(
        self, name: str, policy: FallbackPolicy, next_step: Step, routes: RouteTable
    ) -> None:
        self.name = name
        self.policy = policy
        self.on = frozenset(policy.on)
        self.next = next_step
        self.routes = routes
        #: Calls the fallback answered, calls it failed too, and calls whose deadline was
        #: used up before it could be tried.
        self.used = 0
        self.failed = 0
        self.unused = 0

    async def __call__(self, invocation: Invocation) -> Any:
        try:
            return await self.next(invocation)
        except DispatchError as error:
            if error.type not in self.on:
                raise
            return await self._fall_back(invocation, error)

    async def _fall_back(self, invocation: Invocation, error: DispatchError) -> Any:
        if invocation.deadline - asyncio.get_running_loop().time() < LEAST_FALLBACK_SECONDS:
            self.unused += 1
            raise error
        policy = self.policy
        route = self.routes.find(policy.plugin, invocation.method, policy.version, "running")
        origin = f"{invocation.plugin}@{invocation.version}.{invocation.method}"
        target = f"{route.plugin}@{route.version}.{route.method}"
        fallback = Invocation(
            route.plugin,
            route.version,
            route.method,
            invocation.params,
            invocation.deadline,
            invocation.request_id,
            invocation.caller,
            invocation.traceparent,
            invocation.idempotency_key,
        )
        try:
            if route.validate is not None:
                route.validate(fallback.params)
            result = await route.invoke(fallback)
        except DispatchError as second:
            self.failed += 1
            log.warning(
                "%s failed with %s (%s); its fallback %s failed too: %s",
                origin,
                error.type,
                error.message,
                target,
                second,
            )
            raise second.with_details(
                fallback_from={"plugin": origin, "error": error.to_wire()}
            ) from error
        self.used += 1
        log.info(
            "%s failed with %s (%s); answered by its fallback %s",
            origin,
            error.type,
            error.message,
            target,
            extra={"fallback_from": origin, "fallback_to": target, "error_type": error.type},
        )
        return result

    def stats(self) -> dict[str, Any]:
        return {
            "to": self.policy.plugin + (f"@{self.policy.version}" if self.policy.version else ""),
            "used": self.used,
            "failed": self.failed,
            "deadline_used_up": self.unused,
        }

    def __repr__(self) -> str:
        return (
            f"<Fallback {self.name} → {self.policy.plugin} used={self.used} failed={self.failed}>"
        )


class Fallbacks:
    """The fallbacks of every route, by ``plugin@version.method``; a reload re-points them
    at its new routing table and forgets those of removed versions (and those a changed
    version's methods no longer have: its routes are rebuilt, with their fallbacks)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Fallback] = {}

    def wrap(
        self, plugin: PluginSpec[Any], method: str, next_step: Step, routes: RouteTable
    ) -> Step:
        """``next_step`` with its method's fallback around it, if the manifest gives one."""
        policy = plugin.policies_of(method).fallback
        if policy is None:
            return next_step
        name = f"{plugin.key}.{method}"
        fallback = self._by_name[name] = Fallback(name, policy, next_step, routes)
        return fallback

    def forget(self, plugins: Iterable[PluginSpec[Any]]) -> None:
        for plugin in plugins:
            for method in plugin.methods:
                self._by_name.pop(f"{plugin.key}.{method}", None)

    def point_at(self, routes: RouteTable) -> None:
        for fallback in self._by_name.values():
            fallback.routes = routes

    def stats(self) -> dict[str, Any]:
        return {name: fallback.stats() for name, fallback in self._by_name.items()}
