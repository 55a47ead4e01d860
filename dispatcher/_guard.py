"""Who may call, and the record of every call: what ``Dispatcher.call`` adds once the
manifest configures ``auth``, ``access`` or ``audit`` (or a caller brings a ``Principal``).

For each call, in this order, before any policy or target sees it:

1. **authenticate**: ``credentials=`` (what the gateway's transport saw) go through the
   manifest's authenticator (``dispatcher.identity``); a ``Principal`` passed as
   ``caller`` is taken as the host's word. With ``access`` configured, a call with
   neither — no caller, or a bare string — is ``Unauthorized``.
2. **authorize**: the principal's roles against ``access`` (``dispatcher.access``) for the
   resolved ``plugin@version.method`` → ``Forbidden``. A name that resolves to nothing is
   checked as written first, so a caller who may not call it gets ``Forbidden``, not the
   list of what exists that ``PluginNotFound`` carries; one who may is told it is not
   there, without that list (``Guard.missing``).
3. **audit**: when the call ends, however it ends (refused while draining, unauthorized,
   forbidden, invalid, failed, cancelled, or answered), exactly one record
   (``dispatcher.audit``). While the log is ``max_backlog`` records behind its sink, calls
   are refused before anything else (``Overloaded``) and counted, not recorded one by one.

The principal's ``id`` becomes ``Invocation.caller``: rate limits with ``scope: caller``,
per-caller caches and the plugin's ``context.caller`` see it. With none of this
configured and a plain string caller, ``Dispatcher.call`` never enters this module.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from contextvars import Token
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from dispatcher._routes import Route, RouteTable
from dispatcher._text import encodable_text
from dispatcher.access import AccessControl
from dispatcher.audit import AuditLog, timestamp
from dispatcher.fleet.instances import Instance
from dispatcher.fleet.served import SERVED_BY
from dispatcher.identity import ChainAuthenticator, Credentials, Principal, refused
from linchkit_plugin.errors import (
    DispatchError,
    InvalidParams,
    MethodNotFound,
    Overloaded,
    PluginError,
    PluginNotFound,
)

__all__ = ["Audited", "Caller", "Guard"]

#: What ``Dispatcher.call`` accepts as ``caller``.
Caller = str | Principal | None


@dataclass(slots=True)
class Audited:
    """What the audit record of one call, stream or event will say; the dispatcher fills in
    ``caller`` (once authenticated) and ``route`` (once resolved) as the call goes.

    A context manager: leaving its block, however it is left, writes the one record
    (``Guard.end``) with what ended it."""

    guard: Guard
    kind: str  # "call", "stream" or "event"
    caller: Caller
    plugin: str
    version: str | None
    method: str
    request_id: str
    traceparent: str | None
    params: Any
    started: float
    served: tuple[list[Instance], Token[list[Instance] | None]] | None
    route: Route | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.guard.end(self, error)


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
#: Names in a record are cut here: a gateway caller chooses them, the log must stay sane.
_MAX_NAME = 256


class Guard:
    """Authentication, access checks and audit records of one dispatcher."""

    __slots__ = ("access", "audit", "authenticator", "clock")

    def __init__(
        self,
        authenticator: ChainAuthenticator | None,
        access: AccessControl | None,
        audit: AuditLog | None,
    ) -> None:
        self.authenticator = authenticator
        self.access = access
        self.audit = audit
        self.clock: Callable[[], float] = lambda: 0.0  # the loop's, set when the dispatcher starts

    @property
    def active(self) -> bool:
        """Whether every call must pass here (access or audit configured)."""
        return self.access is not None or self.audit is not None

    async def principal_of(self, caller: Caller, credentials: Credentials | None) -> Caller:
        """The caller of a call: authenticated from ``credentials`` when given."""
        if credentials is None:
            return caller
        if caller is not None:
            raise InvalidParams("pass either caller or credentials, not both")
        if self.authenticator is None:  # nothing configured can prove anything
            raise refused()
        return await self.authenticator.authenticate(credentials)

    def caller_id(self, caller: Caller) -> str | None:
        """What the invocation carries as ``caller``; ``Unauthorized`` if access needs a
        principal and there is none."""
        if isinstance(caller, Principal):
            return caller.id
        if self.access is not None:
            raise refused()
        return caller

    def authorize(self, caller: Caller, plugin: str, version: str, method: str) -> None:
        if self.access is not None and isinstance(caller, Principal):
            self.access.check(caller, plugin, version, method)

    async def resolve(
        self,
        routing: Callable[[], tuple[RouteTable, str]],
        plugin: str,
        method: str,
        version: str | None,
        caller: Caller,
        credentials: Credentials | None,
        entry: Audited | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[Route, str | None]:
        """The route of a guarded call and the caller id its invocation carries: the caller
        authenticated, then authorized for what the name resolves to. ``routing``: the
        dispatcher's routing table and state, read once the caller is authenticated (that
        may wait for a key set: a reload swapping the table meanwhile must route the call,
        for it waits only for those routed at its swap). ``entry``, when the call is
        audited, learns the principal and the route as soon as they are known.
        ``idempotency_key``: the call's, which a rollout splits by (``RouteTable.find``)."""
        principal = await self.principal_of(caller, credentials)
        if entry is not None:
            entry.caller = principal
        caller_id = self.caller_id(principal)
        routes, state = routing()
        route = self.authorized_route(
            routes, state, plugin, method, version, principal, idempotency_key
        )
        if entry is not None:
            entry.route = route
        return route, caller_id

    def authorized_route(
        self,
        routes: RouteTable,
        state: str,
        plugin: str,
        method: str,
        version: str | None,
        caller: Caller,
        idempotency_key: str | None = None,
    ) -> Route:
        """The route of ``plugin.method`` if ``caller`` may call it; ``Forbidden`` if not,
        also for a name that resolves to nothing (no listing of what exists for them)."""
        try:
            route = routes.find(plugin, method, version, state, idempotency_key)
        except (PluginNotFound, MethodNotFound) as missing:
            raise self.missing(missing, caller, plugin, version, method) from None
        self.authorize(caller, route.plugin, route.version, route.method)
        return route

    def missing(
        self,
        error: PluginNotFound | MethodNotFound,
        caller: Caller,
        plugin: str,
        version: str | None,
        method: str,
    ) -> DispatchError:
        """What ``caller`` is told of ``plugin@version.method`` (a method, or an event),
        which resolves to nothing (``error``): ``Forbidden`` is raised if it may not call
        the name as written. Under ``access`` the error names what was asked, and not
        the manifest's plugins, versions and methods it lists: a role may call a name
        that does not exist (``*`` but not ``vault.*``; ``billing.*`` but not
        ``billing.admin_*``) and be denied some of those, which ``Dispatcher.may_call``
        and the gateway's listings keep from it."""
        self.authorize(caller, plugin, version or "", method)
        if self.access is None:
            return error
        if isinstance(error, MethodNotFound):
            return MethodNotFound(
                f"plugin {plugin!r:.80} has no method {method!r:.80} in the manifest"
            )
        wanted = plugin if version is None else f"{plugin}@{version}"
        return PluginNotFound(f"no plugin {wanted!r:.160} in the manifest")

    def begin(
        self,
        kind: str,
        caller: Caller,
        plugin: str,
        version: str | None,
        method: str,
        request_id: str,
        traceparent: str | None = None,
        params: Any = None,
    ) -> Audited:
        """Open the audit entry of a call, stream or event starting now; ``end``, or
        leaving the entry's ``with`` block, writes it. A call also notes which fleet
        instances serve it (audited calls only).

        ``Overloaded`` when the audit log is behind its sink (``AuditLog.behind``): what
        cannot be recorded does not run; the log counts the refusal instead."""
        audit = self.audit
        if audit is not None and audit.behind():
            audit.count_refused()
            raise Overloaded(
                f"the audit log {audit.name} is {audit.max_backlog} records behind its sink:"
                " calls are refused until it takes them (retry later)"
            )
        served: tuple[list[Instance], Token[list[Instance] | None]] | None = None
        if kind == "call" and audit is not None:
            instances: list[Instance] = []
            served = instances, SERVED_BY.set(instances)
        started = self.clock()
        return Audited(
            self,
            kind,
            caller,
            plugin,
            version,
            method,
            request_id,
            traceparent,
            params,
            started,
            served,
        )

    def end(self, entry: Audited, error: BaseException | None) -> None:
        """Write the one audit record of ``entry``, which has ended with ``error`` (or not)."""
        instances: list[Instance] | None = None
        if entry.served is not None:
            instances = entry.served[0]
            SERVED_BY.reset(entry.served[1])
        audit = self.audit
        if audit is None:
            return
        route = entry.route
        record: dict[str, Any] = {
            "time": timestamp(),
            "kind": entry.kind,
            "request_id": _clip(entry.request_id),
            "trace_id": _trace_id(entry.traceparent),
            "principal": _principal(entry.caller),
            "plugin": _clip(entry.plugin),
            "version": route.version if route is not None else _clip(entry.version),
            "method": _clip(entry.method),
            "instance": (
                instances[-1].target.describe()
                if instances
                else (route.target if route is not None else None)
            ),
            "outcome": "ok" if error is None else _outcome(error),
            "duration_ms": round((self.clock() - entry.started) * 1000, 3),
        }
        if isinstance(error, PluginError):
            record["error_type"] = _clip(error.remote_type)
        if route is not None and route.audit_params:
            record["params"] = entry.params
        try:
            audit.write(record)
        except TypeError:  # params orjson cannot write (JSONEncodeError is a TypeError)
            record["params"] = "<not JSON>"
            audit.write(record)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        if self.access is not None:
            stats["access"] = self.access.stats()
        if self.audit is not None:
            stats["audit"] = self.audit.stats()
        return stats


def _principal(caller: Caller) -> dict[str, str] | None:
    if isinstance(caller, Principal):
        return {"id": _clip(caller.id), "proven_by": caller.proven_by}
    if isinstance(caller, str):  # a host's plain string: its word, nothing proved
        return {"id": _clip(caller), "proven_by": "unverified"}
    return None


def _outcome(error: BaseException) -> str:
    if isinstance(error, DispatchError):
        return error.type
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    if isinstance(error, GeneratorExit):  # a stream's consumer stopped reading it
        return "closed"
    return "internal_error"


def _trace_id(traceparent: str | None) -> str | None:
    if traceparent is None or len(traceparent) != 55:
        return None
    match = _TRACEPARENT.fullmatch(traceparent)
    return match.group(1) if match is not None else None


def _clip(name: object) -> Any:
    # A lone surrogate (a name refused as one no route has, a caller's text the call was
    # refused for) is kept as its escape: orjson cannot write it, and the record of the
    # refusal was lost to a TypeError raised in its caller's face.
    if isinstance(name, str) and len(name) > _MAX_NAME:
        return encodable_text(name[:_MAX_NAME] + "…")
    if name is None or isinstance(name, str):
        return name if name is None else encodable_text(name)
    return repr(name)[:_MAX_NAME]
