"""The provider seam: what a function target driver implements.

A provider drives one kind of function target (in-process, HTTP, Lambda, …). The
dispatcher makes one instance per provider kind and shares it across every plugin that
uses it, so clients and connection pools are pooled per dispatcher. Providers know
nothing of policies (cache, retries, breakers): those wrap ``invoke`` from outside.

Contract, for implementers:

* ``invoke`` returns the plugin's result or raises a ``DispatchError``; every vendor
  exception is translated here, at the boundary, and nowhere else.
* ``invoke`` honours ``invocation.deadline`` with the transport's own timeout and raises
  ``DeadlineExceeded`` when it passes.
* ``invoke_batch`` returns one ``Outcome`` per invocation, in order; one item's failure
  fails only that item. The default fans out concurrently; providers whose wire has a
  batch form override it and set ``native_batch``.
* Everything ``start`` opens, ``aclose`` closes: no task, socket or process outlives it.
* A provider that connects where the manifest says (a URL, an address, a socket) checks
  ``self.egress`` (``providers.egress``) when it connects, after name resolution, and
  lists those places in its target model's ``destinations()`` so they are checked when
  the manifest loads too. The dispatcher hands it the manifest's policy through
  ``use_egress`` before ``start``; a provider that connects nowhere ignores both.
* ``send_event`` delivers a host event to the plugin version it names on the target it
  names, never to another plugin or version attached on an equal target.
* ``logs`` yields the output of the plugin behind a target, oldest line first, where the
  provider keeps or can read it (a child's stderr, a container's log); the default raises
  ``LogsUnavailable``. It never ends by itself with ``follow``: the caller stops reading.
* ``served_methods`` says which methods the plugin behind a target serves, as the plugin
  listed them (``providers.served`` bounds the list), or None where the binding cannot
  say; it reuses what the provider learnt (a ``Describe`` at start, a WebSocket
  ``hello``) and asks the plugin only where it learnt nothing, within ``timeout``. A
  provider that learns the list by itself (at start, on a connection, on a connection
  found again) tells the dispatcher through ``report_served``, which logs the routed
  methods it lacks; None there is a plugin asked that said nothing believable, which the
  dispatcher remarks only where that plugin had said what it serves.
* ``update`` takes the new manifest entry of a plugin version a reload changed on a
  target it left equal (nothing is attached again there): the provider holds that entry
  from then on and reports again what the plugin last said it serves, so the dispatcher
  checks it against the new entry's routes. No connection or process is touched.
* ``detach_queue`` says which detaches depend on each other's order: the dispatcher
  runs those of one queue one after another, newest attachment first, and different
  queues at once (its plugins at a close or a reload, and a fleet's instances that
  discovery brought, at a close or as they leave). The default, one queue for all of a
  provider's attachments, is always right; a provider whose attachments share nothing
  says so, so that a close with many plugins that hang costs about one stop, not one
  each. A provider whose detach never waits may keep the default.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Self, TypeVar

from linchkit_plugin.errors import DispatchError, Forbidden, ProviderError
from providers.capabilities import Translation
from providers.deploy import Deployer
from providers.discovery import InstanceSource
from providers.egress import EgressPolicy
from providers.invocation import Invocation, Outcome
from providers.target import PluginInfo, TargetConfig

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "CONNECT_STAGE",
    "ColdStarts",
    "Health",
    "LogsUnavailable",
    "Provider",
    "ResultTooLarge",
    "ServedReport",
    "TargetConfig",
]

#: ``details`` of an error of a call that certainly never ran: the connection could not be
#: opened, the request could not be written whole, or the plugin answered that it did not
#: run it. A fleet may send such a call to another instance, whatever the method
#: (``dispatcher.fleet.step``). Set only where that is certain; anything that may have
#: reached the plugin carries no such marker.
CONNECT_STAGE = {"stage": "connect"}


TargetT = TypeVar("TargetT", bound=TargetConfig)


class LogsUnavailable(ProviderError):
    """The provider keeps no output of its plugins, or cannot read it for this target."""


class ResultTooLarge(DispatchError):
    """A job's result over ``jobs.max_result_bytes``: the plugin answered, the dispatcher
    did not keep it (not retried: the same call would answer as much again). Stored and
    read back (``dispatcher._jobs.ended_error``), it is this class again, with its details
    (``limit``, ``bytes``); before 2026-12-04 it was read back as a ``PluginError`` of this
    type. Here, below the jobs that raise it, because a provider reads it back too: a
    gateway's gRPC port names it in its ``error-type`` trailer (``providers._grpc.status``)."""

    type = "result_too_large"


@dataclass(frozen=True, slots=True)
class Health:
    """A target's health as a provider sees it."""

    status: Literal["serving", "not_serving", "unknown"]
    detail: str = ""
    latency_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "serving"


@dataclass(frozen=True, slots=True)
class ServedReport:
    """What a plugin said it serves, as a provider learnt it (``Provider.report_served``)."""

    plugin: PluginInfo
    #: The manifest's target, or one of its instances.
    target: TargetConfig
    #: None: the plugin was asked and said nothing believable (``providers.served``).
    served: frozenset[str] | None
    #: Where the plugin said it, for messages: the target, or one connection to it.
    place: str


@dataclass(slots=True)
class ColdStarts:
    """The cold starts of one target: how many calls waited for an instance to start, and
    the seconds they waited in all (a call's wait, from its first try to its answer)."""

    count: int = 0
    seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds


class Provider(abc.ABC, Generic[TargetT]):
    """Drives one kind of function target."""

    #: The value of ``target.provider`` this driver serves.
    name: ClassVar[str]
    #: The pydantic model of this provider's targets.
    target_model: ClassVar[type[TargetConfig]]
    #: True when ``invoke_batch`` sends a whole batch in one request.
    native_batch: ClassVar[bool] = False
    #: True when ``invoke`` ends every call by its deadline with the transport's own
    #: timeout; otherwise the dispatcher wraps calls in a deadline guard.
    enforces_deadline: ClassVar[bool] = True
    #: Where plugin events go, as ``sink(plugin_id, version, event, data)``: the version
    #: that emitted it, since two run side by side in a rollout; set by the dispatcher.
    #: Providers hand a plugin ``event_sink_of(plugin)``, bound to its id and version.
    event_sink: Callable[[str, str, str, Any], None] | None = None
    #: True when a plugin on this provider's targets has a channel back to the host, so
    #: what it emits reaches ``Dispatcher.on``; False where the binding has none (HTTP,
    #: Knative, Lambda, Wasm, Docker): ``Dispatcher.on`` then warns, as the SDK does.
    delivers_events: ClassVar[bool] = True
    #: Where a provider reports what a plugin says it serves, as soon as it learns it;
    #: set by the dispatcher, which compares it with the manifest's routes.
    served_sink: Callable[[ServedReport], None] | None = None
    #: Where this provider may connect; the defaults until ``use_egress`` is called.
    egress: EgressPolicy = EgressPolicy()

    def use_egress(self, policy: EgressPolicy) -> None:
        """Connect only where ``policy`` allows. Called by the dispatcher before ``start``
        with the manifest's ``egress``; override to pass it to a client built earlier."""
        self.egress = policy

    async def start(self) -> None:
        """Open clients and pools. Called once, before any plugin is attached."""

    async def aclose(self) -> None:
        """Close everything ``start`` and ``attach`` opened."""

    async def attach(self, plugin: PluginInfo, target: TargetT) -> None:
        """Make ``plugin`` callable on ``target`` (run its lifecycle where the provider owns it).

        Remote targets run their own lifecycle on their own servers; the default does nothing.
        """

    async def detach(self, plugin: PluginInfo, target: TargetT) -> None:
        """Undo ``attach``: stop and destroy what the provider started."""

    def update(self, plugin: PluginInfo, target: TargetT) -> None:
        """A reload changed the manifest entry of ``plugin`` (same id and version: its
        methods, their policies) and left ``target`` equal, so ``plugin`` is not attached
        there again: hold this entry from now on in place of the one attached, and report
        again what the plugin last said it serves (``report_served``), so it is checked
        against this entry's routes, now and when the plugin says it again. Nothing is
        reconnected or restarted: what the plugin started with (``config``, ``lifecycle``,
        ``runtime``, ``protocol``) cannot change under one version (a reload refuses it).

        No await: the dispatcher calls it once the new routes are installed. The default
        does nothing, for a provider that keeps no entry past ``attach``.
        """

    def detach_queue(self, plugin: PluginInfo, target: TargetT) -> Hashable:
        """Which of this provider's queues the dispatcher detaches ``plugin`` on ``target``
        in (a close, a reload that removes several plugins). The detaches of one queue run
        one after another, newest attachment first; those of different queues at once.

        Attachments whose detaches depend on each other's order must share a queue (entries
        at one gRPC address: the service keeps the config of the one detached last). The
        default puts every attachment of the provider in one queue, which is always right
        but makes a close wait for each slow detach in turn: a provider whose attachments
        share nothing returns what tells them apart (its key of what it started).
        """
        return None

    @abc.abstractmethod
    async def invoke(self, target: TargetT, invocation: Invocation) -> Any:
        """Run one invocation; return its result or raise ``DispatchError``."""

    async def invoke_batch(
        self, target: TargetT, invocations: Sequence[Invocation]
    ) -> list[Outcome[Any]]:
        """Run several invocations; one outcome each, in order."""
        return list(await asyncio.gather(*(self._outcome(target, i) for i in invocations)))

    def stream(self, target: TargetT, invocation: Invocation) -> AsyncGenerator[Any, None]:
        """The chunks of a streaming method, as they come; errors raise ``DispatchError``.

        Providers that stream (local, gRPC, subprocess, WebSocket) override this with an
        async generator; the default raises ``ProviderError`` on the first chunk.
        """
        return _no_stream(self.name, invocation)

    def delivers_events_on(self, target: TargetT) -> bool:
        """Whether the plugin behind ``target`` can send events to the host:
        ``delivers_events``, unless the target turns its events off (``events: false``)."""
        return self.delivers_events

    async def send_event(self, plugin: PluginInfo, target: TargetT, event: str, data: Any) -> None:
        """Deliver a host event to ``plugin`` at its version on ``target``
        (``Dispatcher.publish``), and to nothing else running there.

        Several plugins, or a rollout's two versions of one, may be attached on equal
        targets (one command, one class): a provider that runs one instance per plugin
        and target sends to that plugin's alone. Where a target is one plugin process the
        provider does not start (a gRPC address, a dialled WebSocket), sending on its
        connection is sending to that plugin.
        """
        raise ProviderError(f"the {self.name} provider cannot send events to plugins")

    def cold_starts(self) -> dict[str, ColdStarts]:
        """Cold starts so far, by target (its ``describe()``): calls that had to wait for an
        instance of the plugin to start. Providers that start instances on demand (Docker,
        Knative) report them; the others start everything at attach and report none."""
        return {}

    async def health(self, target: TargetT) -> Health:
        """Probe the target. Must not raise: report what is wrong in ``Health``."""
        return Health("unknown", "this provider has no health probe")

    async def served_methods(
        self, plugin: PluginInfo, target: TargetT, *, timeout: float
    ) -> frozenset[str] | None:
        """The methods ``plugin`` on ``target`` says it serves (``providers.served``), or
        None when its binding cannot say (the default), the plugin did not say, or asking
        failed. What the provider learnt already is reused; only where it learnt nothing
        is the plugin asked, within ``timeout``. Must not raise."""
        return None

    def event_sink_of(self, plugin: PluginInfo) -> Callable[[str, Any], None] | None:
        """``sink(event, data)`` for the events of ``plugin`` at its version (None when
        the dispatcher takes none): what a provider hands the transport of one attached
        plugin, so each event names the plugin and version that emitted it."""
        sink = self.event_sink
        if sink is None:
            return None
        plugin_id, version = plugin.id, plugin.version
        return lambda event, data: sink(plugin_id, version, event, data)

    def report_served(
        self,
        plugin: PluginInfo,
        target: TargetT,
        served: frozenset[str] | None,
        *,
        place: str | None = None,
    ) -> None:
        """Tell the dispatcher what ``plugin`` on ``target`` said it serves, when the
        provider learnt it by itself (a ``Describe`` at start or after a lost connection,
        a WebSocket ``hello``); None when the plugin was asked and said nothing
        believable. ``place`` names where, when not the target (one inbound connection)."""
        sink = self.served_sink
        if sink is not None:
            sink(ServedReport(plugin, target, served, place or target.describe()))

    def logs(
        self, plugin: PluginInfo, target: TargetT, *, follow: bool, lines: int
    ) -> AsyncIterator[str]:
        """The plugin's output on ``target``: its last ``lines`` lines, then, with ``follow``,
        each new line as it comes (until the caller stops iterating).

        Providers that run the plugin where they can read its output (a child process, a
        container) override this with an async generator; the default raises
        ``LogsUnavailable`` on the first line.
        """
        return _no_logs(self.name, plugin)

    def sandbox(self, plugin: PluginInfo, target: TargetT) -> Translation | None:
        """How ``plugin``'s capabilities are enforced on ``target`` (``dispatcher inspect``):
        what this provider enforces and what it cannot here; None when it does not sandbox
        this target (the default)."""
        return None

    def instance_source(self, target: TargetT) -> InstanceSource | None:
        """A source of ``target``'s instances that only this provider knows (plugins that
        connect to the dispatcher, containers it starts), or None: the default.

        The dispatcher watches it like the sources the manifest names
        (``dispatcher.fleet.membership``); the target must then say it is a fleet
        (``TargetConfig.is_fleet``) and turn the source's endpoints into its instances
        (``TargetConfig.instance_at``).
        """
        return None

    async def admit(self, target: TargetT, *, bearer: str | None, principal: str | None) -> None:
        """Let a plugin that dials in (the gateway's ``/v1/plugins/connect``) serve as an
        instance of ``target``, or raise ``Unauthorized``/``Forbidden``. ``bearer`` is the
        token it presented, ``principal`` who the manifest's ``auth`` says it is (or None).
        Only targets that say ``TargetConfig.accepts_connections`` get here; the default
        refuses."""
        raise Forbidden(f"the {self.name} provider takes no inbound connections")

    async def accept(
        self,
        plugin: PluginInfo,
        targets: Sequence[TargetT],
        connection: Any,
        peer: tuple[str, int],
    ) -> None:
        """Serve an admitted connection (the gateway's upgraded WebSocket) as an instance
        of ``targets`` until it closes; reported through ``instance_source``."""
        raise ProviderError(f"the {self.name} provider takes no inbound connections")

    async def close_connections(self, target: TargetT, *, replaced: bool) -> None:
        """A reload left ``target`` (one that ``accepts_connections``) out of the manifest:
        close the plugin connections still open on it, which nothing calls any more,
        telling each plugin why, and refuse any that completes its handshake there later.
        ``replaced``: the new manifest still takes connections of that plugin id (another
        version, or this one on a changed target), so one that dials again may be admitted;
        otherwise the plugin is gone. Called once the calls in flight at the reload's swap
        have ended (or its grace passed). The default: nothing, as nothing connects."""

    async def retarget_connections(self, plugin: PluginInfo, targets: Sequence[TargetT]) -> None:
        """A reload changed ``plugin`` (same id and version) so that the targets of it
        that ``accepts_connections`` are now ``targets``, another set than it was admitted
        to: a plugin connected in serves all of them over one connection, joined to each
        one's fleet when it is admitted, so close those connections admitted to another
        set once their calls in flight have ended, sending them none meanwhile (and any
        such that completes its handshake later, at once), telling each plugin to
        connect again: it is admitted to ``targets``. Called after ``close_connections``,
        once the calls in flight at the reload's swap have ended. The default: nothing,
        as nothing connects."""

    def deployer(self) -> Deployer[TargetT] | None:
        """How this provider deploys its targets (``dispatcher deploy``); None if it cannot."""
        return None

    async def _outcome(self, target: TargetT, invocation: Invocation) -> Outcome[Any]:
        try:
            return Outcome(result=await self.invoke(target, invocation))
        except DispatchError as error:
            return Outcome(error=error)

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

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


async def _no_stream(provider: str, invocation: Invocation) -> AsyncGenerator[Any, None]:
    raise ProviderError(
        f"{invocation.plugin}.{invocation.method}: the {provider} provider has no streaming calls"
    )
    yield  # pragma: no cover - makes this an async generator


async def _no_logs(provider: str, plugin: PluginInfo) -> AsyncGenerator[str, None]:
    raise LogsUnavailable(
        f"{plugin.key}: the {provider} provider keeps no logs of its plugins "
        "(read them where the plugin runs)"
    )
    yield  # pragma: no cover - makes this an async generator
