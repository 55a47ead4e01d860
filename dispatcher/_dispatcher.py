"""``Dispatcher``: what the host calls, and the owner of everything a call needs.

It starts the providers and attaches the plugins, resolves ``plugin.method`` through the
routing table (``dispatcher._routes``) built once at start, fixes each call's deadline,
and hands the invocation to the method's policy chain; leaving it stops all of that.
``drain`` (or ``aclose(grace=…)``, or ``drain_on_signal``) stops it gracefully: no new
work, the work in flight gets a grace period (``dispatcher._drain``).

What stays here is what must change together: the lifecycle (start, drain, reload,
aclose) and the call API (call, call_many, stream, publish, submit), each counted in
flight so a drain or a reload can wait for it or cut it off, and the order in which the
parts below are built and torn down. Each part with a job of its own lives apart, and the
methods here only put them in order: routes (``_routes``), what each provider has
attached (``_attachments``), in-flight bookkeeping (``_drain``), what a reload changes
(``_reload``) and the steps that carry it out (``_reload_steps``), how a method's route
is built (``_route_build``), the guard, access checks and audit entry of each call
(``_guard``), host events in and out (``_events``, ``_publish``), async jobs (``_jobs``
runs them, ``_job_view`` checks, queues and shows them), fallbacks (``_fallback``),
rollouts (``_rollout``), health (``_health``), routed methods a plugin does not serve
(``_served``), signals (``_signals``), plugins dialling in (``_inbound``); policies and
fleets below them all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Self

from dispatcher._attachments import Attachments, providers_for
from dispatcher._drain import InFlight, checked_grace, current_task_getter
from dispatcher._events import EventHandler, EventHandlers, EventListener
from dispatcher._fallback import Fallbacks
from dispatcher._guard import Caller, Guard
from dispatcher._health import TargetHealth, probe_targets
from dispatcher._inbound import Admission, admit
from dispatcher._job_view import (
    Submission,
    Submissions,
    job_result,
    job_status,
    job_store_of,
    new_submission,
    owned_job_status,
)
from dispatcher._jobs import JobWorkers
from dispatcher._public_errors import ErrorDetail
from dispatcher._publish import EventSender
from dispatcher._reload import plan_reload
from dispatcher._reload_steps import ReloadSteps
from dispatcher._rollout import RolloutListener, RolloutRuntime
from dispatcher._route_build import RouteBuilder
from dispatcher._routes import Route, RouteTable, checked_timeout
from dispatcher._served import ServedCheck
from dispatcher._signals import SignalDrain
from dispatcher._text import checked_call_text
from dispatcher._versions import check_protocol
from dispatcher.access import AccessControl
from dispatcher.audit import AuditLog
from dispatcher.config import DEFAULT_TIMEOUT_MS, Manifest, PluginSpec, load_manifest
from dispatcher.config.loader import collector_paused
from dispatcher.fleet import FleetRuntime
from dispatcher.fleet.breaker import StateListener as CircuitListener
from dispatcher.identity import ChainAuthenticator, Credentials, Principal, authenticator_of
from dispatcher.policies import PolicyRuntime
from dispatcher.state import JobStore, StateBackend, new_backend
from dispatcher.telemetry import TelemetryRuntime
from linchkit_plugin.errors import (
    DispatchError,
    PluginNotFound,
    ShuttingDown,
    Unauthorized,
)
from providers.base import Provider
from providers.invocation import Invocation, new_request_id

#: How long a reload lets calls to the plugins it removes finish, by default.
RELOAD_GRACE_SECONDS = 30.0

if TYPE_CHECKING:
    from types import TracebackType

    from dispatcher._entries import RegistryEntries

__all__ = ["Call", "Dispatcher", "TargetHealth"]

log = logging.getLogger("dispatcher")


@dataclass(frozen=True, slots=True)
class Call:
    """One call for ``Dispatcher.call_many``; a plain ``(plugin, method, params)`` tuple works too."""

    plugin: str
    method: str
    params: Any = None
    caller: str | Principal | None = None
    timeout: float | None = None


def _log_failure(teardown: asyncio.Future[None]) -> None:
    """The end of a close its caller stopped waiting for: a failure is logged, since
    nobody else will hear of it."""
    if not teardown.cancelled() and (error := teardown.exception()) is not None:
        log.error("closing the dispatcher failed", exc_info=error)


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
        self.state_backend: StateBackend | None = (
            None  # where policies keep state (dispatcher.state)
        )
        self.fleets: FleetRuntime | None = None
        self.jobs: JobWorkers | None = None  # workers of async jobs (dispatcher._jobs)
        self._submissions = Submissions()  # jobs submitted here, by route and outcome
        self._events_out: EventSender | None = None  # host events to plugins (dispatcher._publish)
        self._circuit_listeners: list[CircuitListener] = []
        self._events = EventHandlers()
        #: Providers and what each has attached (dispatcher._attachments).
        self._attachments = Attachments(
            providers if providers is not None else providers_for(manifest),
            manifest.egress,
            self._events.emit,
            ServedCheck(),
        )
        self._providers = self._attachments.providers
        self._routes = RouteTable()
        #: The manifest's ``rollouts``: traffic splits and shadows (dispatcher._rollout).
        self._rollouts = RolloutRuntime(self._clock)
        self._fallbacks = Fallbacks()
        self._build: RouteBuilder | None = None  # from start(): routes need the policies
        self._reload_steps: ReloadSteps | None = None  # from start(), as the routes
        self._state = "new"
        # Draining (dispatcher._drain): what is in flight, aliased for the hot path.
        self._in_flight = InFlight()
        self._calls = self._in_flight.calls
        self._cut = self._in_flight.cut
        self._draining = False
        self._current_task: Callable[[], asyncio.Task[Any] | None] = asyncio.current_task
        self._drained: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        #: The close under way or done (``aclose``): a task of its own, so a cancelled
        #: ``aclose`` leaves no half-closed dispatcher behind.
        self._teardown: asyncio.Future[None] | None = None
        self._signal_drain = SignalDrain(lambda grace: self.aclose(grace=grace))
        #: The file ``reload_from_file`` reads again (``from_file`` sets it).
        self.manifest_path: str | None = None
        self._reloading = asyncio.Lock()
        #: Plugin entries published in etcd (dispatcher._entries): every reload merges them
        #: into the file's manifest, kept here without them.
        self._file_manifest = manifest
        self.registry: RegistryEntries | None = None
        if manifest.registry is not None:
            # Imported only when used: its etcd client loads aiohttp, which a host calling
            # in-process plugins alone never needs.
            from dispatcher._entries import RegistryEntries

            self.registry = RegistryEntries(
                manifest.registry, self._apply_registry, waiting=self._reload_waiting
            )
        # Who may call what, and the audit log (dispatcher._guard). ``_guarded``: every
        # call must pass the guard; without it the hot path is one attribute check.
        self.authenticator: ChainAuthenticator | None = authenticator_of(manifest)
        self._guard = Guard(
            self.authenticator,
            AccessControl(manifest.access) if manifest.access is not None else None,
            AuditLog(
                None if manifest.audit.to_stdout else manifest.audit.path,
                max_backlog=manifest.audit.max_backlog,
            )
            if manifest.audit is not None
            else None,
        )
        self._guarded = self._guard.active
        # Telemetry (dispatcher.telemetry): None unless the manifest or OTEL_* ask for it;
        # then it wraps each route's chain and the provider boundary, nothing else.
        self.telemetry = TelemetryRuntime.from_manifest(manifest.telemetry, self.stats)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **options: Any) -> Self:
        """A dispatcher for the manifest at ``path`` (YAML or TOML)."""
        dispatcher = cls(load_manifest(path), **options)
        dispatcher.manifest_path = os.fspath(path)
        return dispatcher

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"a dispatcher starts once; this one is {self._state}")
        self._state = "starting"
        loop = asyncio.get_running_loop()
        self._clock = self._guard.clock = self._rollouts.clock = loop.time
        self._current_task = current_task_getter(loop)
        self._closed = loop.create_future()
        self.fleets = FleetRuntime(self._clock, detached=self._instance_detached)
        config = self.manifest.state
        self.state_backend = new_backend(config, self._clock, self.manifest.jobs)
        await self.state_backend.start()
        telemetry = self.telemetry
        self.policies = PolicyRuntime(
            self._clock,
            self.fleets,
            self.state_backend,
            breaker_sync=config.breaker_sync_ms / 1000,
            idempotency_retention=config.idempotency_retention_ms / 1000,
            boundary=None if telemetry is None else telemetry.boundary,
            refused=None if telemetry is None else telemetry.refused,
        )
        self._build = RouteBuilder(self.policies, self._providers, self._fallbacks.wrap, telemetry)
        self._reload_steps = ReloadSteps(
            attachments=self._attachments,
            build=self._build,
            fallbacks=self._fallbacks,
            rollouts=self._rollouts,
            fleets=self.fleets,
            policies=self.policies,
            in_flight=self._in_flight,
            current_task=self._current_task,
            draining=lambda: self._draining,
        )
        self._events_out = EventSender(self._providers, self.policies, self.fleets, self._clock)
        if telemetry is not None:
            telemetry.start()
            self._circuit_listeners.append(telemetry.breaker_changed)
            self.policies.breakers_forgotten.append(telemetry.breaker_forgotten)
        self.policies.breaker_listeners.extend(self._circuit_listeners)
        try:
            if self._guard.audit is not None:
                self._guard.audit.open()  # first: a log that cannot be written stops the start
            if self.authenticator is not None:
                await self.authenticator.start()
            await self._attachments.start()
            with collector_paused():  # routes and chains: objects that all live on
                for plugin in self.manifest.plugins:
                    await self._attach(plugin)
            self._rollouts.configure(self.manifest.rollouts, self._routes)
            await self.fleets.start()
            store = self.state_backend.jobs
            if self.manifest.jobs.workers and store is not None:
                self.jobs = JobWorkers(
                    store,
                    self.manifest.jobs,
                    self._run_job,
                    config.retry_after_ms / 1000,
                    egress=self.manifest.egress,
                    key_retention=config.idempotency_retention_ms / 1000,
                )
                self.jobs.start()
        except BaseException:
            await self.aclose()
            raise
        self._state = "running"
        if self.registry is not None:
            await self.registry.start()  # its entries apply as a reload, now and on change

    async def aclose(self, *, grace: float | None = None) -> None:
        """Stop every plugin (in reverse start order), then close every provider.

        With ``grace`` (seconds), ``drain(grace)`` first: calls in flight may finish.
        Without it, batch items still queued are sent, and every call still in flight ends
        in ``ShuttingDown``, ``details["stage"] == "cut_off"``: one whose target closes
        under it (raised from the provider's error), one still running after that (an
        in-process plugin's) cut off. A second ``aclose`` while the first runs waits for
        it. A cancelled ``aclose`` stops waiting, not closing: the close goes on to its
        end (a close cut in half would leave plugins running that nothing stops any
        more), and a later ``aclose`` or ``wait_closed`` waits for that end.
        """
        teardown = self._teardown
        if teardown is None and grace is not None and self._state in ("running", "draining"):
            await self.drain(grace)
            teardown = self._teardown  # another aclose may have begun while this drained
        if teardown is None:
            closer = asyncio.current_task()
            teardown = self._teardown = asyncio.ensure_future(self._tear_down(closer))
            try:
                await asyncio.shield(teardown)  # its failure is this caller's
            except asyncio.CancelledError:
                teardown.add_done_callback(_log_failure)  # nobody waits for it now
                raise
            return
        signalled = self._signal_drain.task
        if teardown is asyncio.current_task() or (
            signalled is not None and signalled is asyncio.current_task()
        ):
            return  # called from within the close itself: waiting would never end
        await asyncio.wait([teardown])  # another caller's close: its failure is the other's

    async def _tear_down(self, closer: asyncio.Task[Any] | None) -> None:
        """What ``aclose`` does, in a task of its own that a cancelled caller leaves running;
        ``closer`` (the first ``aclose``'s caller) is not cut off as a call in flight."""
        try:
            await self._close_parts(closer)
        finally:
            if self._closed is not None and not self._closed.done():
                self._closed.set_result(None)

    async def _close_parts(self, closer: asyncio.Task[Any] | None) -> None:
        drained = self._drained is not None
        if self.registry is not None:
            await self.registry.aclose()  # first: no registry change applies while closing
        if self.jobs is not None:  # first: their jobs run on the routes and the state below
            await self.jobs.aclose()
        self._state = "closed"
        self._routes.clear()
        await self._rollouts.aclose()  # shadow calls: their callers have their answers
        if self.fleets is not None:
            await self.fleets.aclose()  # health checks end before the providers close
        if self.policies is not None:
            # Batches still queued go out before targets detach; after a drain, none is
            # waiting for its answer any more.
            await self.policies.aclose(grace=0.0 if drained else None)
        await self._events.aclose()
        if self.state_backend is not None:
            await self.state_backend.aclose()  # after the chains: their last records are written
        # From here calls in flight fail as their targets close: the dispatcher's doing,
        # so they end in ShuttingDown, not in a TargetUnavailable blaming the plugin.
        self._in_flight.closing = True
        if self.fleets is not None:
            await self.fleets.detach_all()  # the instances discovery brought
        await self._attachments.aclose()  # every plugin detached, then every provider closed
        await self._cut_off_in_flight(closer)  # what outlived its target: an in-process plugin's
        if self.authenticator is not None:
            await self.authenticator.aclose()
        if self._guard.audit is not None:
            await self._guard.audit.aclose()  # last: every call above has its record now
        self._signal_drain.forget()
        if self.telemetry is not None:
            await self.telemetry.aclose()  # spans of the last calls are sent

    async def _cut_off_in_flight(self, closer: asyncio.Task[Any] | None) -> None:
        """What still runs once every target has gone is cut off: a call of an in-process
        plugin ran on after ``aclose`` had stopped its plugin, and answered."""
        if self._in_flight.count:
            cut = await self._in_flight.cut_off_and_wait(closer, "the dispatcher closed")
            log.info("closing: cut off %d calls and streams still in flight", cut)

    async def wait_closed(self) -> None:
        """Return once the dispatcher has closed: for a host that waits for a signal
        (``drain_on_signal``) to end it."""
        if self._closed is None:
            raise RuntimeError("the dispatcher has not started")
        await asyncio.shield(self._closed)

    # -- draining ---------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Stop taking work and let the calls in flight finish, for ``grace`` seconds at most.

        From the moment it is called, new calls, streams and publishes raise
        ``ShuttingDown`` (retryable: another replica may take them) and ``health()`` and
        ``stats()`` say the dispatcher is draining. Calls in flight go on, batch items
        queued go out now; when ``grace`` has passed, whatever still runs is cancelled
        and raises ``ShuttingDown`` to its caller (``details["stage"] == "cut_off"``).
        It returns once nothing is in flight; the dispatcher stays open (``aclose`` it,
        or use ``aclose(grace=…)`` for both). A second ``drain`` waits for the first.
        """
        grace = checked_grace(grace)
        if self._drained is not None:
            await asyncio.shield(self._drained)
            return
        loop = asyncio.get_running_loop()
        self._drained = loop.create_future()
        self._draining = self._in_flight.tell_left = True
        if self.jobs is not None:
            self.jobs.stop_taking()  # jobs not taken stay on the stream for other replicas
        if self._state == "running":
            self._state = "draining"
        try:
            await self._drain(loop.time() + grace, grace)
        finally:
            self._drained.set_result(None)

    async def _drain(self, deadline: float, grace: float) -> None:
        in_flight = self._in_flight
        log.info("draining: %d calls and streams in flight, %g s of grace", in_flight.count, grace)
        if self.policies is not None:
            self.policies.flush_batches()  # queued items need not wait out their window
        if await in_flight.wait_idle(deadline):
            return
        cut = await in_flight.cut_off_and_wait(
            asyncio.current_task(), "the dispatcher's drain grace ran out"
        )
        log.warning("drain grace of %g s ran out: cut off %d calls and streams", grace, cut)

    def drain_on_signal(self, *, grace: float, signals: Iterable[int] = (signal.SIGTERM,)) -> None:
        """On any of ``signals`` (default SIGTERM), drain for ``grace`` seconds, then close.

        Opt-in, for hosts whose process a supervisor (Kubernetes, systemd) stops with a
        signal. Installs loop signal handlers (Unix, main thread), removed when the
        dispatcher closes; ``wait_closed()`` returns once the signal has done its work.
        """
        grace = checked_grace(grace)
        if self._state not in ("running", "draining"):
            raise RuntimeError(
                f"drain_on_signal needs a running dispatcher; this one is {self._state}"
            )
        self._signal_drain.install(grace, signals)

    # -- reloading --------------------------------------------------------------------

    async def reload_from_file(
        self, path: str | os.PathLike[str] | None = None, *, grace: float = RELOAD_GRACE_SECONDS
    ) -> dict[str, list[str]]:
        """``reload`` the manifest at ``path`` (default: the one ``from_file`` read).
        A file that does not load raises its ``ManifestError`` and changes nothing."""
        if path is None:
            path = self.manifest_path
        if path is None:
            raise RuntimeError("this dispatcher was not made from a file: pass the path")
        manifest = load_manifest(path)
        summary = await self.reload(manifest, grace=grace, source=os.fspath(path))
        self.manifest_path = os.fspath(path)
        return summary

    async def reload(
        self,
        manifest: Manifest[Any],
        *,
        grace: float = RELOAD_GRACE_SECONDS,
        source: str = "<manifest>",
    ) -> dict[str, list[str]]:
        """Switch to ``manifest`` without a restart; returns the plugin versions
        (``id@version``) it ``added``, ``removed``, ``changed`` and ``kept``.

        Checked first (``dispatcher._reload``): a change to a section that cannot change
        live (``state``, ``auth``, ``gateway``…) or to what a running version was started
        with raises ``ManifestError`` and changes nothing; so does a plugin that fails
        to attach. Then new versions and targets are attached, and the routes swap at
        once: calls routed before keep their route, calls after see the new manifest.
        Unchanged versions keep their routes, policy state and processes. Last, what is
        no longer used is detached once the calls in flight at the swap have ended, or
        ``grace`` seconds have passed (then calls still using it fail as it goes).
        Reloads run one at a time.
        """
        grace = checked_grace(grace)
        async with self._reloading:
            if self._state != "running":
                raise RuntimeError(f"reload needs a running dispatcher; this one is {self._state}")
            file_manifest = manifest
            if self.registry is not None:  # the registry's entries stay through a file reload
                manifest = self.registry.merge(file_manifest, self.manifest, source=source)
            plan = plan_reload(
                self.manifest,
                manifest,
                source=source,
                still_attached=self._attachments.still_attached(manifest),
            )
            steps = self._reload_steps  # carried out on the parts (dispatcher._reload_steps)
            assert steps is not None
            attached = await steps.attach(plan)
            if self._state == "closed":  # closed while attaching: nothing is swapped in
                await steps.abandon(attached)
                raise ShuttingDown(
                    "the dispatcher closed while the reload attached its new versions:"
                    " nothing was reloaded",
                    details={"stage": "refused"},
                )
            # The swap: the new table replaces the old with no await in between, so no call
            # sees half of it.
            routes = steps.new_routes(manifest, plan, self._routes)
            self._routes = routes
            self.manifest = manifest
            steps.serve(routes, plan)
            self._file_manifest = file_manifest
            await steps.finish(manifest, plan, attached, grace, source)
            return plan.summary()

    def _instance_detached(self) -> None:
        """A discovered instance that left its fleet is detached: the breakers kept by its
        key go too, unless a target of the manifest or another fleet's member shares it.
        Else every address DNS or a registry ever listed grew ``stats()`` until a reload.
        During a reload, its end does it: the routes it builds are not the table's yet."""
        steps = self._reload_steps
        if steps is not None and self._state == "running" and not self._reloading.locked():
            steps.forget_dead_targets()

    def _reload_waiting(self) -> asyncio.Task[Any] | None:
        """The task whose reload waits now for the calls in flight at its swap, if any."""
        return None if self._reload_steps is None else self._reload_steps.waiting

    async def _apply_registry(self) -> dict[str, list[str]]:
        return await self.reload(self._file_manifest, source="the registry")

    def _routing(self) -> tuple[RouteTable, str]:
        """The routing table and the state now, for ``Guard.resolve`` to read once the
        caller is authenticated: a reload may swap the table while that awaits, and a
        drain may begin (and end: nothing counted the call yet), so it is refused then."""
        if self._draining:
            raise self._refused("a call whose caller was still being authenticated")
        return self._routes, self._state

    def _refused(self, what: str) -> ShuttingDown:
        return ShuttingDown(
            f"the dispatcher is {self._state}: {what} refused; send it to another replica",
            details={"stage": "refused"},
        )

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
        caller: Caller = None,
        credentials: Credentials | None = None,
        timeout: float | None = None,
        traceparent: str | None = None,
        idempotency_key: str | None = None,
        request_id: str | None = None,
        wait_at_most: float | None = None,
    ) -> Any:
        """Call ``plugin.method`` with ``params`` and return its result.

        ``caller``: who calls — a ``Principal`` the host authenticated, or (without
        ``access`` in the manifest) a plain string; ``credentials``: what a transport saw
        (the gateway), authenticated with the manifest's ``auth``. ``timeout`` (seconds)
        overrides the method's ``timeout_ms`` and bounds the whole call;
        ``wait_at_most`` (seconds: how long the caller waits, a gRPC client's deadline)
        only shortens the deadline ``timeout`` or ``timeout_ms`` sets, never lengthens
        it, so no value of it is too far. Raises a
        ``DispatchError`` subclass on any failure: ``Unauthorized`` and ``Forbidden``
        before any policy runs, ``ShuttingDown`` once the dispatcher drains.
        """
        if (
            self._guarded
            or credentials is not None
            or (caller is not None and caller.__class__ is not str)
        ):
            return await self._guarded_call(
                plugin,
                method,
                params,
                version,
                caller,
                credentials,
                timeout,
                traceparent,
                idempotency_key,
                request_id,
                wait_at_most,
            )
        route: Route | None = None
        try:
            if self._draining:
                raise self._refused(f"call of {plugin}.{method}")
            route = self._routes.find(plugin, method, version, self._state, idempotency_key)
            invocation = self._invocation(
                route,
                params,
                timeout,
                request_id,
                caller,
                traceparent,
                idempotency_key,
                wait_at_most,
            )
        except DispatchError as refused:
            if self.telemetry is not None:  # refused before the chain, which counts the rest
                self._count_refused(plugin, method, route, refused)
            raise
        invoke = route.invoke if idempotency_key is None else route.keyed(version)
        # In flight: the task and what it may reach, so a drain can wait for it and cut it
        # off, and a reload wait for it (dispatcher._drain). InFlight.tracked, inlined:
        # this is the per-call hot path.
        task = self._current_task()
        calls = self._calls
        if task is None:
            return await invoke(invocation)
        if task in calls:  # a call from inside a call: the outer one counts, reaching any
            calls[task] = None
            return await invoke(invocation)
        calls[task] = route.reaches
        try:
            return await invoke(invocation)
        except (asyncio.CancelledError, DispatchError) as error:
            if self._cut and task in self._cut:
                raise self._in_flight.cut_off_error(
                    task, f"the call of {route.name}", error
                ) from None
            if self._in_flight.closed_under(error):  # aclose closed its target under it
                raise self._in_flight.closed_under_error(
                    f"the call of {route.name}", error
                ) from error
            raise
        finally:
            calls.pop(task, None)
            if self._in_flight.tell_left:
                self._in_flight.left(task)

    async def _guarded_call(
        self,
        plugin: str,
        method: str,
        params: Any,
        version: str | None,
        caller: Caller,
        credentials: Credentials | None,
        timeout: float | None,
        traceparent: str | None,
        idempotency_key: str | None,
        request_id: str | None,
        wait_at_most: float | None,
    ) -> Any:
        """``call`` through authentication, access checks and the audit log (``_guard``)."""
        request_id = request_id or new_request_id()
        with self._guard.begin(
            "call", caller, plugin, version, method, request_id, traceparent, params
        ) as entry:
            try:
                if self._draining:
                    raise self._refused(f"call of {plugin}.{method}")
                route, caller_id = await self._guard.resolve(
                    self._routing,
                    plugin,
                    method,
                    version,
                    caller,
                    credentials,
                    entry,
                    idempotency_key,
                )
                invocation = self._invocation(
                    route,
                    params,
                    timeout,
                    request_id,
                    caller_id,
                    traceparent,
                    idempotency_key,
                    wait_at_most,
                )
            except DispatchError as refused:
                if self.telemetry is not None:  # refused before the chain, which counts the rest
                    self._count_refused(plugin, method, entry.route, refused)
                raise
            invoke = route.invoke if idempotency_key is None else route.keyed(version)
            return await self._in_flight.tracked(
                invoke(invocation), f"the call of {route.name}", route.reaches
            )

    def _count_refused(
        self, plugin: str, method: str, route: Route | None, error: DispatchError
    ) -> None:
        """Count a call refused before its chain ran. Names a caller made up are no
        labels (the series would be theirs to multiply): unknown ones count as ``?``."""
        assert self.telemetry is not None
        if route is not None:
            plugin, method = route.plugin, route.method
        elif not self._routes.has_plugin(plugin):
            plugin, method = "?", "?"
        else:
            method = "?"
        self.telemetry.refused(plugin, method, error)

    def _invocation(
        self,
        route: Route,
        params: Any,
        timeout: float | None,
        request_id: str | None,
        caller: str | None,
        traceparent: str | None,
        idempotency_key: str | None,
        wait_at_most: float | None = None,
    ) -> Invocation:
        """Check the params (a keyed call's: its idempotency step, ``Route.once``) and
        fix the deadline of one call of ``route``."""
        if not (
            caller is None
            and request_id is None
            and traceparent is None
            and idempotency_key is None
        ):  # most calls carry none of them: no function call for them (the hot path)
            checked_call_text(caller, request_id, traceparent, idempotency_key)
        if params is None:
            params = {}
        # A keyed call's params are checked by its idempotency step, once its key's record
        # is read: a retry is answered by its record whatever the schema where it landed.
        if route.validate is not None and idempotency_key is None:
            route.validate(params)
        budget = route.timeout if timeout is None else checked_timeout(timeout, route.name)
        if wait_at_most is not None and wait_at_most < budget:
            budget = checked_timeout(wait_at_most, route.name)
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

    # -- async jobs ----------------------------------------------------------------------

    async def submit(
        self,
        plugin: str,
        method: str,
        params: Any = None,
        *,
        version: str | None = None,
        caller: Caller = None,
        credentials: Credentials | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        error_detail: ErrorDetail = "full",
    ) -> str:
        """Queue a call of ``plugin.method`` on the shared job stream; its job id, at once.

        A worker of any replica (``jobs: {workers: N}``) runs it later through the method's
        chain, retrying retryable errors (``dispatcher._jobs``); ``result`` and ``job`` read
        it. Checked now: the method exists (its version is fixed now, unless a rollout
        chose it), ``caller`` may call it, the params match its schema, ``callback_url``
        (POSTed the job's record when it ends, ``dispatcher._job_callbacks``) is allowed by
        the manifest's ``egress``. With
        ``access`` or ``audit`` configured the submission is audited (kind ``submit``).
        Raises ``JobsUnavailable`` on the memory backend and ``StateUnavailable`` when
        Redis does not take the job. ``error_detail``: how the callback tells an error that
        is the infrastructure's: as written (``full``, for a caller in this process), or as
        a gateway answering ``safe`` does, which passes its own (``dispatcher._public_errors``).
        """
        store = job_store_of(self.state_backend)
        if self._draining:
            raise self._refused(f"job of {plugin}.{method}")
        submission = new_submission(
            params, idempotency_key, callback_url, self.manifest.egress, error_detail
        )
        if not (
            self._guarded
            or credentials is not None
            or (caller is not None and caller.__class__ is not str)
        ):
            route = self._routes.find(plugin, method, version, self._state, submission.split_key)
            caller_id = caller if isinstance(caller, str) else None
            return await self._queue(store, submission, route, caller_id, named=version)
        with self._guard.begin(
            "submit", caller, plugin, version, method, submission.job_id, None, submission.params
        ) as entry:
            route, caller_id = await self._guard.resolve(
                self._routing,
                plugin,
                method,
                version,
                caller,
                credentials,
                entry,
                submission.split_key,
            )
            return await self._queue(store, submission, route, caller_id, named=version)

    async def _queue(
        self,
        store: JobStore,
        submission: Submission,
        route: Route,
        caller_id: str | None,
        *,
        named: str | None,
    ) -> str:
        backend = self.state_backend
        assert backend is not None  # job_store_of found the store on it
        return await self._submissions.queue(
            store,
            backend.idempotency,
            self.manifest.state.idempotency_retention_ms / 1000,
            submission,
            route,
            caller_id,
            self.manifest.jobs.max_params_bytes,
            named=named,
        )

    async def job(self, job_id: str) -> dict[str, Any]:
        """The status record of job ``job_id``: state, attempts, error, times (integers, ms
        since the epoch), result once succeeded. ``JobNotFound`` if there is none."""
        return await job_status(job_store_of(self.state_backend), job_id)

    async def job_for(self, job_id: str, caller: str | None) -> dict[str, Any]:
        """``job`` as ``caller`` may read it: only a job it submitted (None: one submitted
        anonymously). Another caller's is ``JobNotFound``, as a job that does not exist;
        its record is not fetched whole, nor decoded (``dispatcher._job_view``)."""
        return await owned_job_status(job_store_of(self.state_backend), job_id, caller)

    async def result(self, job_id: str, *, wait: float = 0.0) -> Any:
        """The result of job ``job_id``, waiting up to ``wait`` seconds for it to end.

        Raises the job's own error (typed, as ``call`` would have, but not retryable and
        with ``details["state"]`` ``"failed"`` or ``"dead"``: the job has ended) when it
        failed or was dead-lettered, ``JobNotFinished`` when it has not ended within ``wait``.
        """
        return await job_result(job_store_of(self.state_backend), job_id, wait, self._clock)

    async def _run_job(self, record: dict[str, str], params: Any) -> Any:
        """One attempt of a job, through its method's chain like any call (tracked, so a
        drain waits for it); the caller's access was checked when it was submitted. A job
        a rollout placed is placed again, and ``record["version"]`` says where it runs."""
        route = self._routes.find(
            record["plugin"], record["method"], record["version"], self._state
        )
        split_key = record.get("split_key")
        if split_key is not None:
            route = self._routes.placed_again(route, split_key)
            record["version"] = route.version
        key = record.get("idempotency_key")
        invocation = self._invocation(
            route, params, None, record.get("id"), record.get("caller"), None, key
        )
        invoke = route.invoke if key is None else route.once
        return await self._in_flight.tracked(
            invoke(invocation), f"job {record.get('id')} of {route.name}", route.reaches
        )

    async def call_many(
        self,
        calls: Iterable[Call | tuple[str, str] | tuple[str, str, Any]],
        *,
        caller: Caller = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Run several calls concurrently; results in the order of ``calls``.

        ``caller`` is the caller of every call that does not name its own (a ``Call``
        with ``caller``). Every call runs to its end (each is checked and audited on its
        own). Then, unless ``return_exceptions``, the first error (in call order) is
        raised; with it, errors take the place of their results.
        """
        pending = [self._one(item, caller) for item in calls]
        results = await asyncio.gather(*pending, return_exceptions=True)
        if not return_exceptions:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return results

    def _one(self, item: Call | tuple[str, str] | tuple[str, str, Any], caller: Caller) -> Any:
        if isinstance(item, Call):
            return self.call(
                item.plugin,
                item.method,
                item.params,
                caller=item.caller if item.caller is not None else caller,
                timeout=item.timeout,
            )
        return self.call(*item, caller=caller)

    async def stream(
        self,
        plugin: str,
        method: str,
        params: Any = None,
        *,
        version: str | None = None,
        caller: Caller = None,
        credentials: Credentials | None = None,
        timeout: float | None = None,
        traceparent: str | None = None,
        request_id: str | None = None,
        wait_at_most: float | None = None,
    ) -> AsyncIterator[Any]:
        """Call a streaming method; yields its chunks as they arrive.

        ``caller`` and ``credentials`` as for ``call``; the stream has one audit record,
        written when it ends. ``timeout`` bounds the whole stream (the target's deadline);
        ``wait_at_most``, as for ``call``, only shortens it.
        The method's rate limits, bulkhead and breaker apply
        (``dispatcher.policies.gate``); its cache, batching and retries do not. A provider
        without streaming raises ``ProviderError``; a failure mid-stream raises its
        ``DispatchError`` after the chunks already yielded.
        """
        request_id = request_id or new_request_id()
        with self._guard.begin(
            "stream", caller, plugin, version, method, request_id, traceparent, params
        ) as entry:
            if self._draining:
                raise self._refused(f"stream of {plugin}.{method}")
            route, caller_id = await self._guard.resolve(
                self._routing, plugin, method, version, caller, credentials, entry
            )
            invocation = self._invocation(
                route, params, timeout, request_id, caller_id, traceparent, None, wait_at_most
            )
            chunks = self._in_flight.tracked_stream(
                route.open_stream(invocation), f"the stream of {route.name}", route.reaches
            )
            try:
                async for chunk in chunks:
                    yield chunk
            finally:  # now, not when the collector finds it: a drain counts open streams
                await chunks.aclose()

    async def publish(
        self,
        plugin: str,
        event: str,
        data: Any = None,
        *,
        version: str | None = None,
        caller: Caller = None,
        timeout: float = DEFAULT_TIMEOUT_MS / 1000,
    ) -> None:
        """Send the host event ``event`` to ``plugin`` (every target it runs on).

        Each target's own rate limits, bulkhead and breaker apply (those scoped to the
        target: an event belongs to no method), and ``timeout`` bounds the whole publish.
        With ``access`` configured, ``caller`` must be a ``Principal`` allowed
        ``plugin.<event>`` (events are named like methods in the rules); audited once.
        """
        guard = self._guard
        if not self._guarded:
            if self._draining:
                raise self._refused(f"event {event!r} to {plugin}")
            await self._in_flight.tracked(
                self._publish(plugin, event, data, version, timeout), f"event {event!r} to {plugin}"
            )
            return
        with guard.begin("event", caller, plugin, version, event, new_request_id()) as entry:
            if self._draining:
                raise self._refused(f"event {event!r} to {plugin}")
            guard.caller_id(caller)
            try:
                wanted: str | None = self._routes.version_of(plugin, version, self._state)
            except PluginNotFound as missing:
                raise guard.missing(missing, caller, plugin, version, event) from None
            assert wanted is not None
            guard.authorize(caller, plugin, wanted, event)
            entry.version = wanted
            await self._in_flight.tracked(
                self._publish(plugin, event, data, wanted, timeout), f"event {event!r} to {plugin}"
            )

    def _publish(
        self, plugin: str, event: str, data: Any, version: str | None, timeout: float
    ) -> Awaitable[None]:
        assert self._events_out is not None, "publish needs a started dispatcher"
        publish = partial(
            self._events_out.publish,
            self._routes,
            self.manifest.plugins,
            self._state,
            plugin,
            event,
            data,
            version,
            timeout,
        )
        if self.telemetry is None:
            return publish()
        return self.telemetry.events(plugin, event, publish)

    # -- introspection -----------------------------------------------------------------

    async def health(self, *, timeout: float = 5.0) -> list[TargetHealth]:
        """Probe every target of every plugin, concurrently; a fleet, every instance;
        the registry of entries and each entry it left out. ``timeout`` (seconds, each
        probe) must be a usable deadline: ``InvalidParams`` for NaN, infinity or the like."""
        timeout = checked_timeout(timeout, "health")
        registry = [] if self.registry is None else self.registry.health(draining=self._draining)
        return registry + await probe_targets(
            self.manifest,
            self._providers,
            self.policies,
            self.fleets,
            timeout=timeout,
            draining=self._draining,
        )

    def invalidate(self, plugin: str | None = None, method: str | None = None) -> int:
        """Drop cached results: of one plugin, one of its methods, or everything."""
        return self.policies.invalidate(plugin, method) if self.policies is not None else 0

    async def ainvalidate(self, plugin: str | None = None, method: str | None = None) -> int:
        """``invalidate``, returning once every replica sharing the state will miss."""
        return await self.policies.ainvalidate(plugin, method) if self.policies is not None else 0

    def stats(self) -> dict[str, Any]:
        """The dispatcher's state and calls in flight; cache, breaker, batch, retry-budget,
        hedge and fallback counters; plugin events' handlers running and events dropped;
        access checks and the audit log's head."""
        stats = self.policies.stats() if self.policies is not None else {}
        stats["fallbacks"] = self._fallbacks.stats()
        stats["events"] = self._events.stats()
        stats["rollouts"] = self._rollouts.stats()
        stats.update(self._guard.stats())  # "access" and "audit", when configured
        if self.jobs is not None:
            stats["jobs"] = self.jobs.stats()
        if self._submissions.counts:
            stats["job_submissions"] = self._submissions.stats()
        if self.registry is not None:
            stats["registry"] = self.registry.stats()
        stats["cold_starts"] = {
            name: {target: {"count": each.count, "seconds": each.seconds} for target, each in cold}
            for name, provider in self._providers.items()
            if (cold := provider.cold_starts().items())
        }
        stats["dispatcher"] = {
            "state": self._state,
            "draining": self._draining,
            "calls_in_flight": len(self._calls),
            "streams_in_flight": len(self._in_flight.streams),
        }
        return stats

    @property
    def state(self) -> str:
        """``new``, ``starting``, ``running``, ``draining`` or ``closed``."""
        return self._state

    @property
    def draining(self) -> bool:
        """True from the start of a drain on: new calls, streams and events are refused."""
        return self._draining

    def on_rollout(self, listener: RolloutListener) -> None:
        """Call ``listener(event)`` when a rollout advances, completes, rolls back, is
        paused, resumed or aborted (``dispatcher._rollout.RolloutEvent``)."""
        self._rollouts.listeners.append(listener)

    @property
    def checks_access(self) -> bool:
        """Whether the manifest has ``access`` rules: then only a principal they allow
        calls a method."""
        return self._guard.access is not None

    def may_call(self, caller: Principal | None, plugin: str, version: str, method: str) -> bool:
        """Whether ``caller`` may call ``method`` of ``plugin`` at ``version`` under the
        manifest's ``access`` (anyone without it; only a principal with it), decided as a
        call is, without counting a check or a refusal: for what the gateway shows a
        caller (its plugins, methods and errors)."""
        access = self._guard.access
        if access is None:
            return True
        return caller is not None and access.allows(caller, plugin, version, method)

    def control_rollout(
        self, plugin: str, method: str, action: str, *, caller: Principal | None = None
    ) -> dict[str, Any]:
        """``pause``, ``resume`` or ``abort`` the rollout of ``plugin.method``; returns its
        stats. ``MethodNotFound`` if it has none, ``InvalidParams`` for another action.
        With ``access`` configured, ``caller`` must be allowed to call the method: who may
        not send it traffic may not steer it either."""
        if self._guard.access is not None:
            if caller is None:
                raise Unauthorized(f"controlling the rollout of {plugin}.{method} needs a caller")
            version = self._rollouts.stats().get(f"{plugin}.{method}", {}).get("to", "")
            self._guard.authorize(caller, plugin, version, method)
        return self._rollouts.control(plugin, method, action)

    def on_circuit_change(self, listener: CircuitListener) -> None:
        """Call ``listener(breaker, old_state, new_state)`` on every breaker transition."""
        self._circuit_listeners.append(listener)
        if self.policies is not None:
            self.policies.breaker_listeners.append(listener)

    async def admit_plugin(
        self, plugin_id: str, version: str | None, credentials: Credentials
    ) -> Admission:
        """Admit a plugin dialling in as an instance of its inbound target (the gateway's
        ``/v1/plugins/connect``), or raise ``PluginNotFound``/``Unauthorized``/``Forbidden``
        (``dispatcher._inbound``). The gateway then serves the upgraded connection with
        ``Admission.serve``."""
        if self._state != "running" or self._draining:
            raise self._refused("a plugin connection")
        return await admit(
            self.manifest, self._providers, self.authenticator, plugin_id, version, credentials
        )

    def on(self, plugin: str, event: str, handler: EventHandler) -> None:
        """Run ``handler(event, data)`` whenever ``plugin`` emits ``event`` (``"*"``: any event).

        When none of the plugin's targets can carry its events back (an ``http`` target,
        say: ``Provider.delivers_events``), the handler is never called; a WARNING says so,
        once per plugin."""
        self._events.on(plugin, event, handler)
        self._events.warn_if_lost(plugin, self.manifest.plugins, self._providers)

    def on_event(self, listener: EventListener) -> None:
        """Call ``listener(plugin, version, event, data)`` for every event any plugin
        emits, plugins a reload adds included; ``version`` is that of the plugin that
        emitted it (two run at once in a rollout). Synchronous: it must not block."""
        self._events.listen(listener)

    @property
    def providers(self) -> dict[str, Provider[Any]]:
        return dict(self._providers)

    def __repr__(self) -> str:
        plugins = ", ".join(plugin.key for plugin in self.manifest.plugins)
        return f"<Dispatcher {self._state} plugins=[{plugins}] in_flight={self._in_flight.count}>"

    # -- internals -----------------------------------------------------------------------

    async def _attach(self, plugin: PluginSpec[Any]) -> None:
        check_protocol(plugin.key, plugin.protocol)
        await self._attachments.attach(plugin)
        assert self.fleets is not None
        assert self._build is not None
        self._routes.add(plugin, self._build.routes_of(plugin, self._routes))
        for target in plugin.targets():
            self.fleets.serve(plugin, target)
