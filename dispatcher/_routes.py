"""The routing table: ``plugin[@version].method`` → the route a call of it takes.

Built once per plugin version when the dispatcher starts; a route holds everything a
call needs resolved (the policy chain, the stream gate, the compiled params schema, the
default deadline), so the hot path is two dict lookups and one await. Without a version,
calls go to the highest version of the plugin (semantic version order); with a range
(``^1.2``, ``dispatcher._versions``), to the highest version in it. A range is resolved
once per table and remembered: a reload builds a new table, so what it resolved to
follows the routes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from functools import partial
from typing import Any, Protocol

from dispatcher._versions import highest_in_range, version_key
from dispatcher.config import DEFAULT_TIMEOUT_MS, PluginSpec
from dispatcher.fleet import Fleet
from dispatcher.policies import Gate, Step
from dispatcher.policies.idempotency import IdempotencyStep
from dispatcher.state import ANY_VERSION
from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    InvalidParams,
    MethodNotFound,
    PluginNotFound,
    ShuttingDown,
    TargetUnavailable,
)
from providers.base import Provider
from providers.invocation import Invocation
from providers.target import TargetConfig

__all__ = [
    "MAX_TIMEOUT_SECONDS",
    "Route",
    "RouteTable",
    "Split",
    "checked_timeout",
    "version_key",
]

#: The longest deadline a call may have: a day. Longer work belongs in an async job, and a
#: bound keeps ``deadline_ms`` a sane integer on every wire.
MAX_TIMEOUT_SECONDS = 86_400.0


class Route:
    """Everything a call of one method needs, resolved once."""

    __slots__ = (
        "audit_params",
        "gate",
        "invoke",
        "method",
        "name",
        "once",
        "once_unversioned",
        "open_stream",
        "plugin",
        "reaches",
        "stream",
        "target",
        "timeout",
        "validate",
        "version",
    )

    def __init__(
        self,
        plugin: PluginSpec[Any],
        method: str,
        provider: Provider[Any],
        invoke: Step,
        once: IdempotencyStep,
        gate: Gate,
        fleet: Fleet | None = None,
    ) -> None:
        policies = plugin.policies_of(method)
        self.plugin = plugin.id
        self.version = plugin.version
        self.method = method
        self.name = f"{plugin.id}.{method}"
        self.timeout = (policies.timeout_ms or DEFAULT_TIMEOUT_MS) / 1000
        self.validate = _params_validator(plugin.methods[method].params_schema)
        self.invoke = invoke
        #: The chain of a call carrying an idempotency key: ``invoke`` behind the
        #: idempotency step (dispatcher.policies.idempotency), which checks the params
        #: once the key's record is read (``Dispatcher._invocation`` leaves them to it).
        self.once = once.around(once.next, once.other_versions, self.validate)
        #: The same for a call that named no version: its key's record at any version of
        #: the method answers it (a retry after a newer version was deployed, after a
        #: rollout that placed it left the manifest, is the same request, whatever the
        #: schema of the version it reaches now).
        self.once_unversioned = self.once.around(once.next, (ANY_VERSION,))
        self.gate = gate
        #: The plugin versions (keys) a call of it may reach, or None when it may reach
        #: others (a fallback): a reload waits for the calls in flight that may reach a
        #: version it retires, not for the others (``InFlight.wait_settled``).
        self.reaches: frozenset[str] | None = frozenset((plugin.key,))
        #: For the audit log: whether its records carry params, what serves the method.
        self.audit_params = bool(policies.audit_params)
        self.target = plugin.target_of(method).describe()
        if fleet is None:
            (target,) = plugin.target_of(method).instance_targets()
            self.stream = _bind_stream(provider, target)
        else:
            self.stream = _bind_fleet_stream(provider, fleet)
        #: What ``Dispatcher.stream`` opens: the target's stream behind the method's gate
        #: (and telemetry around both, when configured).
        self.open_stream: Callable[[Invocation], AsyncGenerator[Any, None]] = partial(
            gate.stream, open_stream=self.stream
        )

    def keyed(self, version: str | None) -> Callable[[Invocation], Awaitable[Any]]:
        """The chain of a call carrying an idempotency key that named ``version`` (or none):
        a range (``version`` is not this route's own) is answered from the key's record at
        any version it takes."""
        if version is None:
            return self.once_unversioned
        if version == self.version:
            return self.once
        return partial(self.once.in_range, version)

    def with_invoke(self, invoke: Step, other_versions: tuple[str, ...] = ()) -> Route:
        """This route with ``invoke`` around its chain (a rollout measures, a shadow
        mirrors). A call carrying an idempotency key takes it behind the idempotency
        step, which answers it also from a record at ``other_versions`` (a rollout's
        other side: the rollout chose this version, not the caller)."""
        route = object.__new__(Route)
        for name in Route.__slots__:
            setattr(route, name, getattr(self, name))
        route.invoke = invoke
        # Not ``invoke`` alone: keyed calls a rollout routed ran once per duplicate.
        route.once = self.once.around(invoke, other_versions)
        route.once_unversioned = self.once.around(invoke, (ANY_VERSION,))
        return route


class Split(Protocol):
    """Chooses the route of the calls of one method that name no exact version
    (``dispatcher._rollout``: a rollout between two versions, or a shadow)."""

    def covers(self, wanted: str) -> bool:
        """Whether both versions satisfy the range ``wanted`` (then it splits too)."""
        ...

    def pick(self, idempotency_key: str | None) -> Route:
        """The route of one call; a call carrying ``idempotency_key`` goes where the
        key's other calls went (while the split holds)."""
        ...

    def moves(self, version: str) -> bool:
        """Whether this split places calls at ``version`` (a job it placed there may be
        placed again when it runs): one of a rollout's two versions; a shadow moves none."""
        ...


def _bind_stream(
    provider: Provider[Any], target: TargetConfig
) -> Callable[[Invocation], AsyncGenerator[Any, None]]:
    stream = provider.stream

    def stream_target(invocation: Invocation) -> AsyncGenerator[Any, None]:
        return stream(target, invocation)

    return stream_target


def _bind_fleet_stream(
    provider: Provider[Any], fleet: Fleet
) -> Callable[[Invocation], AsyncGenerator[Any, None]]:
    """Each stream goes to one instance the fleet's balancer picks, and stays there: a
    stream that has yielded cannot move, so streams are balanced but never failed over."""
    stream = provider.stream

    async def stream_instance(invocation: Invocation) -> AsyncGenerator[Any, None]:
        instance = fleet.pick()
        if instance is None:
            raise TargetUnavailable(f"{fleet.name} has no instance: {fleet.why_empty()}")
        instance.in_flight += 1
        instance.calls += 1
        try:
            # Closed with this stream, not left to the garbage collector: the provider's
            # stream holds what it counts (a connection's calls in flight) until it ends.
            async with aclosing(stream(instance.target, invocation)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            instance.in_flight -= 1

    return stream_instance


def _params_validator(schema: dict[str, Any] | None) -> Callable[[Any], None] | None:
    if schema is None:
        return None
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    validator = Draft202012Validator(schema)

    def validate(params: Any) -> None:
        try:
            error = best_match(validator.iter_errors(params))
        except RecursionError:  # the validator recurses once per level of nesting
            raise InvalidParams("params are nested too deep to validate") from None
        if error is not None:
            where = "params" + "".join(f"[{part!r}]" for part in error.absolute_path)
            raise InvalidParams(
                _shortened(f"{where}: {error.message}"),
                details={"schema_path": list(error.schema_path)},
            )

    return validate


#: The most of a schema problem said: jsonschema's message quotes the value it refused
#: whole (a 120 KB list came back as a 120 KB message, to the caller and into logs).
MAX_PROBLEM_CHARS = 1000


def _shortened(problem: str) -> str:
    if len(problem) <= MAX_PROBLEM_CHARS:
        return problem
    return f"{problem[:MAX_PROBLEM_CHARS]}… (cut: {len(problem):,} characters in all)"


def checked_timeout(timeout: object, what: str) -> float:
    """``timeout`` in seconds if it is a usable deadline, else the typed error naming it."""
    if type(timeout) is float or type(timeout) is int:
        if 0 < timeout <= MAX_TIMEOUT_SECONDS:  # NaN fails both comparisons
            return float(timeout)
        if timeout <= 0:
            raise DeadlineExceeded(f"{what} was given no time (timeout={timeout!r})")
    raise InvalidParams(
        f"{what}: timeout must be a number of seconds in (0, {MAX_TIMEOUT_SECONDS:g}],"
        f" got {timeout!r:.40}"
    )


class RouteTable:
    """Every route, by plugin version and by plugin (its highest version)."""

    __slots__ = ("_latest", "_ranges", "_splits", "_versions")

    #: Distinct ranges remembered per table; past it the memory starts over (callers
    #: choose the strings, so it must be bounded).
    MAX_RANGES = 1024

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, Route]] = {}
        self._versions: dict[tuple[str, str], dict[str, Route]] = {}
        #: ``(plugin, range)`` → the routes of the highest version in it.
        self._ranges: dict[tuple[str, str], dict[str, Route]] = {}
        #: ``(plugin, method)`` → its rollout or shadow; empty, it costs a call one check.
        self._splits: dict[tuple[str, str], Split] = {}

    def split(self, plugin: str, method: str, split: Split) -> None:
        """Let ``split`` route the calls of ``plugin.method`` naming no exact version."""
        self._splits[(plugin, method)] = split

    def add(self, plugin: PluginSpec[Any], routes: dict[str, Route]) -> None:
        """Add the routes of one plugin version; the highest version becomes the default."""
        self._versions[(plugin.id, plugin.version)] = routes
        self._ranges.clear()  # a new version may be the highest in a range
        current = self.latest_version(plugin.id)
        if current is None or version_key(plugin.version) > version_key(current):
            self._latest[plugin.id] = routes

    def has_plugin(self, plugin: str) -> bool:
        return plugin in self._latest

    def find(
        self,
        plugin: str,
        method: str,
        version: str | None,
        state: str,
        idempotency_key: str | None = None,
    ) -> Route:
        """The route of ``plugin.method``; ``state`` explains a miss while not running.
        ``idempotency_key``: the call's, so that a rollout sends its repeats one way."""
        methods = self._methods(plugin, version, state)
        route = methods.get(method)
        if route is None:
            known = ", ".join(sorted(methods))
            # The manifest's methods, not the plugin's: a method the plugin serves but the
            # manifest does not list is as unknown here, and that is where to add it.
            raise MethodNotFound(
                f"plugin {plugin!r} has no method {method!r} in the manifest; it has: {known}"
            )
        if self._splits:
            split = self._splits.get((plugin, method))
            if split is not None and (
                version is None
                or ((plugin, version) not in self._versions and split.covers(version))
            ):
                return split.pick(idempotency_key)
        return route

    def placed_again(self, route: Route, split_key: str) -> Route:
        """Where the split of ``route``'s method sends ``split_key`` now: the route of a
        job the split placed when it was submitted (a rollback or a step since moves it,
        and its attempts are measured like calls); ``route`` once no split moves its
        version (the rollout left the manifest)."""
        split = self._splits.get((route.plugin, route.method)) if self._splits else None
        if split is None or not split.moves(route.version):
            return route
        return split.pick(split_key)

    def version_of(self, plugin: str, version: str | None, state: str) -> str:
        """The version a call of ``plugin`` goes to (``version``, or the highest)."""
        methods = self._methods(plugin, version, state)
        return next(iter(methods.values())).version

    def latest_version(self, plugin_id: str) -> str | None:
        routes = self._latest.get(plugin_id)
        return next(iter(routes.values())).version if routes else None

    def clear(self) -> None:
        self._latest.clear()
        self._versions.clear()
        self._ranges.clear()
        self._splits.clear()

    def routes_of(self, plugin: str, version: str) -> dict[str, Route]:
        """The routes of one plugin version (a reload keeps them for an unchanged one)."""
        return self._versions[(plugin, version)]

    def plugins(self) -> list[tuple[str, str]]:
        """Every ``(plugin, version)`` routed."""
        return list(self._versions)

    def _methods(self, plugin: str, version: str | None, state: str) -> dict[str, Route]:
        if version is None:
            methods = self._latest.get(plugin)
        else:  # an exact version first: its cost stays one lookup
            methods = self._versions.get((plugin, version)) or self._in_range(plugin, version)
        if not methods:
            raise self._not_found(plugin, version, state)
        return methods

    def _in_range(self, plugin: str, wanted: str) -> dict[str, Route] | None:
        key = (plugin, wanted)
        methods = self._ranges.get(key)
        if methods is not None:
            return methods
        versions = [version for (id_, version) in self._versions if id_ == plugin]
        if not versions:
            return None
        best = highest_in_range(versions, wanted)
        if best is None:
            return None
        if len(self._ranges) >= self.MAX_RANGES:
            self._ranges.clear()
        methods = self._ranges[key] = self._versions[(plugin, best)]
        return methods

    def _not_found(self, plugin: str, version: str | None, state: str) -> DispatchError:
        if state == "closed":
            # As while it drained (retryable, never sent): a host's requests arriving
            # during its own cleanup are not a missing plugin.
            return ShuttingDown(
                f"the dispatcher is closed: a call of {plugin} refused; send it to another replica",
                details={"stage": "refused"},
            )
        if state != "running":
            return PluginNotFound(f"the dispatcher is {state}; call it inside 'async with'")
        wanted = plugin if version is None else f"{plugin}@{version}"
        versions = sorted((v for p, v in self._versions if p == plugin), key=version_key)
        if versions:
            return PluginNotFound(
                f"no version of {plugin!r} satisfies {version!r}; it has: {', '.join(versions)}",
                details={"plugin": plugin, "wanted": version, "versions": versions},
            )
        known = ", ".join(sorted(f"{p}@{v}" for p, v in self._versions)) or "none"
        return PluginNotFound(f"no plugin {wanted!r} in the manifest; known: {known}")

    def __getitem__(self, plugin: str) -> dict[str, Route]:
        """The routes of ``plugin``'s highest version (for tests and debugging)."""
        return self._latest[plugin]
