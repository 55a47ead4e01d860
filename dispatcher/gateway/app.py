"""The gateway's aiohttp application: plugin calls over HTTP, through the same dispatcher,
policies and errors as an in-process caller.

Routes (``docs/gateway.md``):

    POST /v1/plugins/{plugin}/methods/{method}   the params as the JSON body → the envelope
    POST /v1/plugins/{plugin}/methods/{method}:submit   the same, as an async job → 202
    GET  /v1/jobs/{id}                           the job's record (?wait=S: until it ends)
    GET  /v1/jobs/{id}/result                    its result as a call's envelope (202: not yet)
    GET  /v1/plugins                             plugins, versions, methods
    GET  /v1/events                              WebSocket: plugin events, host events
    GET  /v1/plugins/connect                     WebSocket: a plugin dials in (reverse mode)
    GET  /openapi.json                           generated from the manifest (again after a reload)
    GET  /metrics                                Prometheus metrics (telemetry.metrics on; not
                                                 here with its listen; a token with token_env
                                                 or token_file)
    GET  /v1/errors                              the caller's latest errors, counts by plugin
    GET  /v1/rollouts                            every rollout and shadow, step and counters
    POST /v1/rollouts/{plugin}/{method}:{action} pause, resume or abort a rollout (no body)
    GET  /healthz                                the process answers
    GET  /readyz                                 the dispatcher takes calls (503 draining)

A call is handled in this order, so that what costs least refuses first: authenticate
(the headers only), read the call's options from its headers, read the body under the
limits (``dispatcher.gateway.body``), then ``Dispatcher.call``. Nothing a client sent
appears in a log line, and only the params' own shape in an error.

The job routes (``…:submit``, ``/v1/jobs/…``) are ``dispatcher.gateway.job_routes``'s,
registered here; they learn who calls as the call route does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from dispatcher._dispatcher import Dispatcher
from dispatcher._inbound import Admission
from dispatcher._rollout import shown_to
from dispatcher.config import Manifest
from dispatcher.gateway.body import Refused, read_params
from dispatcher.gateway.call_headers import (
    REQUEST_ID,
    TRACEPARENT,
    capped_timeout,
    idempotency_key_of,
    timeout_of,
    version_of,
)
from dispatcher.gateway.credentials import credentials_of
from dispatcher.gateway.disclosure import Disclosure, ManifestNames
from dispatcher.gateway.errors import Answer, answer_of, error_answer
from dispatcher.gateway.events import (
    EventHub,
    EventStream,
    Filter,
    checked_event_id,
    checked_filter_version,
)
from dispatcher.gateway.job_routes import JobRoutes
from dispatcher.gateway.openapi import Allows, openapi_document
from dispatcher.gateway.rechecks import CREDENTIALS_ENDED, Rechecks
from dispatcher.gateway.scrape import metrics_route, scrape_token
from dispatcher.gateway.settings import GatewaySettings
from dispatcher.identity import Authenticator, Credentials, Principal, refused
from linchkit_plugin.errors import (
    DispatchError,
    InvalidParams,
    ProviderError,
    ShuttingDown,
    Unauthorized,
)
from linchkit_plugin.ws_protocol import (
    CLOSE_GOING_AWAY,
    DEFAULT_MAX_MESSAGE_BYTES,
    PLUGIN_ID_HEADER,
    PLUGIN_VERSION_HEADER,
)
from providers.invocation import new_request_id

__all__ = ["GATEWAY_KEY", "HANDLER_ARGS", "HUB_KEY", "Gateway", "create_app"]

log = logging.getLogger("dispatcher.gateway")

_PLUGIN_NAME = re.compile(r"^[A-Za-z0-9._@+-]{1,128}\Z")
#: A plugin id or method name as the manifest admits it (``IDENTIFIER``), at most 256 long.
_MANIFEST_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,255}\Z")
_JSON = "application/json"

HUB_KEY = web.AppKey("event_hub", EventHub)
#: Role sets whose view of the manifest is kept (``Gateway._view``); past this, it starts over.
MAX_VIEWS = 256


@dataclass(frozen=True, slots=True)
class _View:
    """What a caller may see of the manifest: the bodies of ``GET /v1/plugins`` and
    ``/openapi.json``, and the plugins it may call a method of (whose errors it counts)."""

    plugins: bytes
    openapi: bytes
    plugin_ids: frozenset[str]


#: What aiohttp's protocol is told for every connection of the app, whichever runner
#: serves it: bodies are decoded by ``dispatcher.gateway.body``, capped, not by aiohttp.
HANDLER_ARGS: Mapping[str, Any] = {"auto_decompress": False}


class Gateway:
    """The handlers of one gateway over one started ``Dispatcher``."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        settings: GatewaySettings,
        authenticator: Authenticator | None,
    ) -> None:
        self.dispatcher = dispatcher
        self.settings = settings
        #: What callers are told of the infrastructure's failures (``error_detail``).
        self.disclosure = Disclosure(
            settings.error_detail, known=ManifestNames(lambda: dispatcher.manifest)
        )
        #: Who checks credentials: the host's own authenticator when it gave one, else the
        #: manifest's ``auth`` (the dispatcher's). With the dispatcher's, calls hand it the
        #: credentials themselves, so it authenticates, applies ``access`` and writes the
        #: audit record in one place, refusals included.
        self.authenticator: Authenticator | None = authenticator or dispatcher.authenticator
        self._dispatcher_authenticates = (
            authenticator is None and dispatcher.authenticator is not None
        )
        self.hub = EventHub(
            buffer_size=settings.event_buffer, max_pending=settings.max_pending_events
        )
        self.hub.attach(dispatcher)
        # What callers see of the manifest: encoded once per manifest (a reload brings a
        # new one), or once per set of roles under ``access`` (``_view``).
        self._manifest = dispatcher.manifest
        self._everything = self._view_of(None)
        self._views: dict[frozenset[str], _View] = {}
        self._streams: set[EventStream] = set()
        self._plugin_sockets: set[web.WebSocketResponse] = set()
        #: The re-checks of the event streams' and plugins' credentials, one per distinct
        #: credentials however many connections hold them.
        self.rechecks = Rechecks()
        #: ``…:submit`` and ``/v1/jobs/…``, authenticated as the other routes are.
        self.jobs = JobRoutes(
            dispatcher,
            settings,
            self.disclosure,
            caller_of=self._caller,
            authenticate=self._authenticate,
        )

    # -- calls ---------------------------------------------------------------------------

    async def call(self, request: web.Request) -> web.StreamResponse:
        match = request.match_info
        answer = await self.answer_call(
            match["plugin"],
            match["method"],
            request.headers,
            partial(read_params, request, self.settings),
            partial(credentials_of, request),
            unread_body=request.body_exists,
        )
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)

    async def answer_call(
        self,
        plugin: str,
        method: str,
        headers: Mapping[str, str],
        read_params: Callable[[], Awaitable[Any]],
        credentials: Callable[[], Credentials],
        *,
        unread_body: bool,
    ) -> Answer:
        """A call's answer, whichever HTTP stack read the request (aiohttp's route or the
        call lane): ``headers`` matched without case, ``read_params`` raising ``Refused``,
        ``credentials`` what the request presented. ``unread_body``: a body is still to
        be read, so an answer given before reading it closes the connection."""
        sent_id = headers.get("X-Request-Id")
        request_id = sent_id if sent_id is not None and REQUEST_ID.match(sent_id) else None
        request_id = request_id or new_request_id()
        body_read = False
        try:
            if sent_id is not None and request_id != sent_id:
                raise InvalidParams("X-Request-Id is 1-128 characters of A-Z a-z 0-9 . _ : -")
            caller, presented = await self._caller(credentials)
            timeout = capped_timeout(timeout_of(headers), self.settings.max_timeout_ms)
            idempotency_key = idempotency_key_of(headers)
            traceparent = headers.get("traceparent")
            if traceparent is not None and not TRACEPARENT.match(traceparent):
                traceparent = None  # W3C trace context: an invalid one is ignored, not refused
            params = await read_params()
            body_read = True
            result = await self.dispatcher.call(
                plugin,
                method,
                params,
                version=version_of(headers),
                caller=caller,
                credentials=presented,
                timeout=timeout,
                traceparent=traceparent,
                idempotency_key=idempotency_key,
                request_id=request_id,
            )
        except Refused as refused:
            answer = answer_of(refused.error, status=refused.status, close=refused.close)
            answer.headers.update(refused.headers)
        except DispatchError as error:
            unread = not body_read and unread_body
            told = self.disclosure.public(error, plugin, method, request_id)
            answer = answer_of(told, close=unread or isinstance(error, ShuttingDown))
        else:
            try:
                body = orjson.dumps({"ok": True, "result": result})
            except TypeError as error:
                answer = answer_of(ProviderError(f"the plugin's result is not JSON: {error}"))
            else:
                return Answer(200, {"Content-Type": _JSON, "X-Request-Id": request_id}, body)
        answer.headers["X-Request-Id"] = request_id
        return answer

    async def _caller(
        self, credentials: Callable[[], Credentials]
    ) -> tuple[Principal | None, Credentials | None]:
        """What ``Dispatcher.call`` gets to know who calls: the credentials, when the
        dispatcher authenticates, or the principal the host's authenticator found."""
        if self._dispatcher_authenticates:
            return None, credentials()
        if self.authenticator is None:
            return None, None
        return await self._check(credentials()), None

    async def _authenticate(self, request: web.Request) -> Principal | None:
        """The request's principal; raises ``Unauthorized``/``Forbidden`` as the
        authenticator decides."""
        if self.authenticator is None:
            return None
        return await self._check(credentials_of(request))

    async def _check(self, credentials: Credentials) -> Principal | None:
        """What the authenticator makes of ``credentials``. Never logs or repeats what
        the request presented."""
        assert self.authenticator is not None
        try:
            return await self.authenticator.authenticate(credentials)
        except DispatchError:
            raise
        except Exception as error:
            # Its message may quote the credentials: log the type alone.
            log.error(
                "the authenticator failed with %s; refusing the request", type(error).__name__
            )
            raise Unauthorized("the credentials could not be checked") from None

    # -- introspection -------------------------------------------------------------------
    #
    # Under the manifest's ``access`` a caller sees only what it may call: a caller refused
    # a method learns nothing of what exists beyond it, here as from a call's ``Forbidden``.

    async def plugins(self, request: web.Request) -> web.Response:
        """``GET /v1/plugins``: the plugins and methods the caller may call."""
        try:
            view = self._view(await self._authenticate(request))
        except DispatchError as error:
            return error_answer(error)
        return web.Response(body=view.plugins, content_type=_JSON)

    async def openapi(self, request: web.Request) -> web.Response:
        """``GET /openapi.json``: the document of the methods the caller may call."""
        try:
            view = self._view(await self._authenticate(request))
        except DispatchError as error:
            return error_answer(error)
        return web.Response(body=view.openapi, content_type=_JSON)

    async def errors(self, request: web.Request) -> web.Response:
        """The latest errors (``dispatcher.telemetry.errors``) of the caller's own calls
        (anonymous callers share those made anonymously, as they share jobs): a message
        may carry what its caller sent. Counts by plugin and type, of the plugins the
        caller may call."""
        try:
            principal = await self._authenticate(request)
            view = self._view(principal)
        except DispatchError as error:
            return error_answer(error)
        telemetry = self.dispatcher.telemetry
        if telemetry is None:
            return web.json_response({"counts": [], "recent": [], "enabled": False})
        snapshot = telemetry.errors.snapshot()
        caller = principal.id if principal is not None else None
        counts = snapshot["counts"]
        if view is not self._everything:
            counts = [count for count in counts if count["plugin"] in view.plugin_ids]
        recent = [
            self._public_entry(entry) for entry in snapshot["recent"] if entry["caller"] == caller
        ]
        return web.json_response({"counts": counts, "recent": recent, "enabled": True})

    def _public_entry(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A recent error as its caller was told it (``error_detail``)."""
        told = self.disclosure.told(
            str(entry.get("type")), str(entry.get("plugin")), str(entry.get("method"))
        )
        return entry if told is None else {**entry, "message": told}

    async def rollouts(self, request: web.Request) -> web.Response:
        """Every rollout and shadow with its step and counters (``stats()["rollouts"]``)
        of a method the caller may call (at the version it rolls out to)."""
        try:
            principal = await self._authenticate(request)
            view = self._view(principal)
            _no_body(request)
        except DispatchError as error:
            return error_answer(error, close=request.body_exists)
        rollouts = self.dispatcher.stats()["rollouts"]
        if view is not self._everything:
            may_call = self.dispatcher.may_call
            rollouts = {
                name: rollout
                for name, rollout in rollouts.items()
                if may_call(principal, rollout["plugin"], rollout["to"], rollout["method"])
            }
        caller = principal.id if principal is not None else None
        shown = {name: shown_to(rollout, caller) for name, rollout in rollouts.items()}
        return web.json_response({"rollouts": shown})

    def _view(self, principal: Principal | None) -> _View:
        """What ``principal`` may see of the manifest: everything without ``access``;
        with it, what its roles allow (made on a role set's first request, then kept
        until a reload changes the manifest)."""
        if self.dispatcher.manifest is not self._manifest:
            self._manifest = self.dispatcher.manifest
            self._everything = self._view_of(None)
            self._views.clear()
        if not self.dispatcher.checks_access:
            return self._everything
        if principal is None:  # access needs a principal, as a call does
            raise refused()
        roles = principal.roles
        view = self._views.get(roles)
        if view is None:
            if len(self._views) >= MAX_VIEWS:  # role sets come from tokens: bounded
                self._views.clear()
            view = self._views[roles] = self._view_of(partial(self.dispatcher.may_call, principal))
        return view

    def _view_of(self, allows: Allows | None) -> _View:
        manifest = self._manifest
        return _View(
            plugins=orjson.dumps({"plugins": _plugin_list(manifest, allows)}),
            openapi=orjson.dumps(
                openapi_document(
                    manifest,
                    authenticated=self.authenticator is not None,
                    allows=allows,
                    max_timeout_ms=self.settings.max_timeout_ms,
                )
            ),
            plugin_ids=frozenset(
                plugin.id
                for plugin in manifest.plugins
                if allows is None
                or any(allows(plugin.id, plugin.version, method) for method in plugin.methods)
            ),
        )

    async def control_rollout(self, request: web.Request) -> web.Response:
        """``POST /v1/rollouts/{plugin}/{method}:pause|resume|abort``, authenticated and
        checked against ``access`` like a call of the method. The names are checked here,
        before ``access`` sees them: a name no manifest could hold is the caller's mistake
        (400), not a refusal (403), and is never echoed back."""
        try:
            principal = await self._authenticate(request)
            _no_body(request)
            plugin, method, action = _rollout_target(request.match_info)
            stats = self.dispatcher.control_rollout(plugin, method, action, caller=principal)
        except DispatchError as error:
            return error_answer(error, close=request.body_exists)
        return web.json_response({"ok": True, "rollout": stats})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        # Whether this replica takes calls, not whether every plugin serves what the
        # manifest routes to it: a routed method a plugin lacks (``dispatcher health``
        # reports it, the start logs it) fails its own calls, and the plugin's other
        # methods still work. Failing readiness for it would take every replica out of the
        # load balancer at once, as when a rollout ships the manifest naming a new method
        # before the build that serves it: all calls lost instead of one method's.
        dispatcher = self.dispatcher
        if dispatcher.state == "running" and not dispatcher.draining:
            return web.json_response({"status": "ready"})
        headers = {"Retry-After": "1"}
        return web.json_response({"status": dispatcher.state}, status=503, headers=headers)

    async def no_route(self, request: web.Request) -> web.Response:
        path = request.path
        allowed = _allowed_verb(path)
        if allowed is not None and request.method != allowed:
            refusal = InvalidParams(f"{request.method:.16} is not allowed here: use {allowed}")
            answer = error_answer(refusal, status=405, close=request.body_exists)
            answer.headers["Allow"] = allowed
            return answer
        missing = InvalidParams(f"no route {request.method} {path[:200]} (see /openapi.json)")
        return error_answer(missing, status=404, close=request.body_exists)

    # -- events ----------------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        try:
            principal = await self._authenticate(request)
            initial = _subscription_of(request)
        except DispatchError as error:
            return error_answer(error)
        ws = web.WebSocketResponse(
            heartbeat=self.settings.heartbeat, max_msg_size=self.settings.max_body_bytes
        )
        if not ws.can_prepare(request).ok:
            refusal = InvalidParams("/v1/events is a WebSocket: send the upgrade headers")
            return error_answer(refusal, status=426)
        await ws.prepare(request)
        recheck = None
        if self.authenticator is not None:
            credentials = credentials_of(request)
            recheck = partial(
                self.rechecks.until_refused,
                ("events", *_held(credentials)),
                partial(self._check, credentials),
                expiry=_expiry_of,
            )
        stream = EventStream(ws, request, self.hub, self.dispatcher, principal, recheck)
        self._streams.add(stream)
        try:
            await stream.run(initial)
        finally:
            self._streams.discard(stream)
        return ws

    async def close_rechecks(self, app: web.Application) -> None:
        """On cleanup: end the re-checks of connections still held (their sockets are
        closed by now)."""
        await self.rechecks.aclose()

    async def close_streams(self, app: web.Application) -> None:
        """On shutdown: tell every subscriber the gateway is going away (1001), so it
        reconnects elsewhere and resumes, instead of waiting out a heartbeat; plugins
        connected in get the same and dial again (another replica, or this one back)."""
        await asyncio.gather(*(stream.going_away() for stream in tuple(self._streams)))
        await asyncio.gather(
            *(ws.close(code=CLOSE_GOING_AWAY) for ws in tuple(self._plugin_sockets)),
            return_exceptions=True,
        )

    # -- plugins dialling in -----------------------------------------------------------------

    async def connect_plugin(self, request: web.Request) -> web.StreamResponse:
        """Reverse mode: a plugin connects as an instance of its inbound target. Every
        refusal is an HTTP status before the upgrade (``dispatcher._inbound``)."""
        plugin_id = request.headers.get(PLUGIN_ID_HEADER) or request.query.get("plugin")
        version = request.headers.get(PLUGIN_VERSION_HEADER) or request.query.get("version")
        try:
            if plugin_id is None or not _PLUGIN_NAME.match(plugin_id):
                raise InvalidParams(f"say which plugin connects: the {PLUGIN_ID_HEADER} header")
            if version is not None and not _PLUGIN_NAME.match(version):
                raise InvalidParams(f"{PLUGIN_VERSION_HEADER} is not a version")
            admission = await self.dispatcher.admit_plugin(
                plugin_id, version, credentials_of(request)
            )
        except DispatchError as error:
            return error_answer(error)
        ws = web.WebSocketResponse(
            heartbeat=self.settings.heartbeat,
            # A frame must come whole within 1.5 heartbeats of the last (a pong counts), as
            # a dialled plugin's must (providers.websocket.channel.STALL_HEARTBEATS): every
            # byte received puts the ping off, so a plugin trickling one frame would hold
            # its reader, and every call on it, for as long as the frame takes.
            receive_timeout=self.settings.heartbeat * 1.5,
            # The plugin's target's max_message_bytes, as a dialled plugin's: a message
            # over it closes the connection (1009).
            max_msg_size=admission.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES,
            decode_text=False,
        )
        if not ws.can_prepare(request).ok:
            refusal = InvalidParams("/v1/plugins/connect is a WebSocket: send the upgrade headers")
            return error_answer(refusal, status=426)
        await ws.prepare(request)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        where = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("unknown", 0)
        self._plugin_sockets.add(ws)
        watching = asyncio.create_task(
            self._watch_plugin(ws, request, plugin_id, version, admission.expires_at)
        )
        try:
            await admission.serve(ws, where)
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            self._plugin_sockets.discard(ws)
        return ws

    async def _watch_plugin(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        plugin_id: str,
        version: str | None,
        expires_at: float | None,
    ) -> None:
        """Admits a plugin's connection again with the credentials it presented
        (``dispatcher.gateway.rechecks``), and closes it with ``CREDENTIALS_ENDED`` once they
        no longer admit it: a token expired, or changed in the manifest by a reload."""

        credentials = credentials_of(request)
        await self.rechecks.until_refused(
            ("plugin", plugin_id, version, *_held(credentials)),
            partial(self.dispatcher.admit_plugin, plugin_id, version, credentials),
            expires_at,
            expiry=_admission_expiry,
        )
        await ws.close(
            code=CREDENTIALS_ENDED,
            message=b"the credentials this plugin connected with no longer admit it",
        )


GATEWAY_KEY = web.AppKey("gateway", Gateway)


def create_app(
    dispatcher: Dispatcher,
    settings: GatewaySettings | None = None,
    *,
    authenticator: Authenticator | None = None,
) -> web.Application:
    """The gateway over ``dispatcher``, which must be started (and outlive the app).
    ``TelemetryEnvironmentError`` when ``/metrics`` needs a token its variable lacks."""
    settings = settings or GatewaySettings()
    gateway = Gateway(dispatcher, settings, authenticator)
    # client_max_size bounds only aiohttp's own body readers; the gateway reads bodies
    # itself (dispatcher.gateway.body), under max_body_bytes, and decodes a compressed one
    # itself, capped, whichever runner serves the app (handler_args reach its protocol).
    app = web.Application(client_max_size=settings.max_body_bytes, handler_args=HANDLER_ARGS)
    app[HUB_KEY] = gateway.hub
    app[GATEWAY_KEY] = gateway
    # Before the call route, whose {method} would take "name:submit" whole.
    jobs = gateway.jobs
    app.router.add_post("/v1/plugins/{plugin}/methods/{method:[^{}/:]+}:submit", jobs.submit)
    app.router.add_post("/v1/plugins/{plugin}/methods/{method}", gateway.call)
    app.router.add_get("/v1/jobs/{id}", jobs.job, allow_head=False)
    app.router.add_get("/v1/jobs/{id}/result", jobs.job_result, allow_head=False)
    app.router.add_get("/v1/plugins", gateway.plugins, allow_head=False)
    app.router.add_get("/v1/plugins/connect", gateway.connect_plugin, allow_head=False)
    app.router.add_get("/v1/events", gateway.events, allow_head=False)
    app.router.add_get("/openapi.json", gateway.openapi, allow_head=False)
    telemetry = dispatcher.telemetry
    if telemetry is not None and telemetry.metrics is not None:
        metrics = telemetry.settings.metrics
        if metrics.listen is None:  # else on the admin listener only (dispatcher.gateway.admin)
            # A scraper holds none of the callers' credentials: open, like /healthz, unless
            # token_env or token_file names a token of its own (dispatcher.gateway.scrape).
            registry = telemetry.metrics.registry
            app.router.add_get("/metrics", metrics_route(registry, scrape_token(metrics)))
    app.router.add_get("/v1/errors", gateway.errors, allow_head=False)
    app.router.add_get("/v1/rollouts", gateway.rollouts, allow_head=False)
    app.router.add_post("/v1/rollouts/{plugin}/{action}", gateway.control_rollout)
    app.router.add_get("/healthz", gateway.healthz)
    app.router.add_get("/readyz", gateway.readyz)
    app.router.add_route("*", "/{tail:.*}", gateway.no_route)
    app.on_shutdown.append(gateway.close_streams)
    app.on_cleanup.append(gateway.close_rechecks)
    return app


def _held(credentials: Credentials) -> tuple[object, ...]:
    """What a connection's credentials are, as the key its re-checks share: connections
    presenting the same ones are checked once for all."""
    return (
        credentials.authorization,
        credentials.api_key,
        credentials.certificate_subject,
        tuple(credentials.certificate_sans),
    )


def _expiry_of(principal: Principal | None) -> float | None:
    return None if principal is None else principal.expires_at


def _admission_expiry(admission: Admission) -> float | None:
    return admission.expires_at


def _allowed_verb(path: str) -> str | None:
    """The one verb a known route takes, for a 405 that says so instead of a 404."""
    if path.startswith("/v1/plugins/") and "/methods/" in path:
        return "POST"  # methods are called with POST
    if path.startswith("/v1/rollouts/") and path.count("/") == 4:
        return "POST"  # a rollout is steered with POST
    if path == "/v1/rollouts":
        return "GET"
    if path.startswith("/v1/jobs/"):
        return "GET"  # a job is read, never written: it is created by …:submit
    return None


def _no_body(request: web.Request) -> None:
    """Refuse a body on a route that takes none: it is a client expecting its parameters
    read, and left unread it must not be taken for the next request (the answer closes)."""
    if request.body_exists:
        raise InvalidParams(f"{request.path[:80]} takes no body: the URL says everything")


def _rollout_target(match: Any) -> tuple[str, str, str]:
    """``plugin``, ``method`` and ``action`` of ``/v1/rollouts/{plugin}/{method}:{action}``."""
    plugin = match["plugin"]
    method, colon, action = match["action"].rpartition(":")
    if not colon:
        raise InvalidParams("say what to do: /v1/rollouts/{plugin}/{method}:pause|resume|abort")
    if not _MANIFEST_NAME.match(plugin):
        raise InvalidParams("the plugin in the URL is not a plugin id of any manifest")
    if not _MANIFEST_NAME.match(method):
        raise InvalidParams("the method in the URL is not a method name of any manifest")
    return plugin, method, action


def _subscription_of(request: web.Request) -> tuple[tuple[Filter, ...], int | None] | None:
    """A subscription the query states (``plugin``, ``event``, ``version``,
    ``last_event_id``), if any; without one, the client subscribes with its first frame."""
    query = request.query
    if not {"plugin", "event", "version", "last_event_id"} & query.keys():
        return None
    version = checked_filter_version(query.get("version"))
    return (Filter(query.get("plugin"), query.get("event"), version),), checked_event_id(
        query.get("last_event_id")
    )


def _plugin_list(manifest: Manifest[Any], allows: Allows | None) -> list[dict[str, Any]]:
    """Each plugin version with the methods ``allows`` (None: every one); a version with
    none left is not listed."""
    listed = []
    for plugin in manifest.plugins:
        methods = [
            {
                "name": name,
                "description": spec.description,
                "path": f"/v1/plugins/{plugin.id}/methods/{name}",
                "params_schema": spec.params_schema,
            }
            for name, spec in sorted(plugin.methods.items())
            if allows is None or allows(plugin.id, plugin.version, name)
        ]
        if methods or allows is None:
            listed.append(
                {
                    "id": plugin.id,
                    "version": plugin.version,
                    "description": plugin.description,
                    "methods": methods,
                }
            )
    return listed
