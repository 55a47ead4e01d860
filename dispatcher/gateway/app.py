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

Registered here, each learning who calls as the call route does: the job routes
(``…:submit``, ``/v1/jobs/…``: ``dispatcher.gateway.job_routes``), the rollouts'
(``rollout_routes``) and the WebSockets (``/v1/events``, ``/v1/plugins/connect``:
``websocket_routes``). What a caller may see of the manifest is ``manifest_views``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from aiohttp import web

from dispatcher._dispatcher import Dispatcher
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
from dispatcher.gateway.events import EventHub
from dispatcher.gateway.job_routes import JobRoutes
from dispatcher.gateway.manifest_views import ManifestViews
from dispatcher.gateway.rollout_routes import RolloutRoutes
from dispatcher.gateway.scrape import metrics_route, scrape_token
from dispatcher.gateway.settings import GatewaySettings
from dispatcher.gateway.websocket_routes import WebSocketRoutes
from dispatcher.identity import Authenticator, Credentials, Principal
from linchkit_plugin.errors import (
    DispatchError,
    InvalidParams,
    ProviderError,
    ShuttingDown,
    Unauthorized,
)
from linchkit_plugin.wire import result_fragment
from providers.invocation import new_request_id

__all__ = ["GATEWAY_KEY", "HANDLER_ARGS", "HUB_KEY", "Gateway", "create_app"]

log = logging.getLogger("dispatcher.gateway")

_JSON = "application/json"

HUB_KEY = web.AppKey("event_hub", EventHub)

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
        #: What callers see of the manifest: encoded once per manifest (a reload brings a
        #: new one), or once per set of roles under ``access``.
        self.views = ManifestViews(
            dispatcher,
            authenticated=self.authenticator is not None,
            max_timeout_ms=settings.max_timeout_ms,
        )
        #: ``/v1/rollouts``, authenticated as the other routes are.
        self.rollouts = RolloutRoutes(dispatcher, self.views, authenticate=self._authenticate)
        #: ``/v1/events`` and ``/v1/plugins/connect``, and the connections they hold.
        self.sockets = WebSocketRoutes(
            dispatcher,
            settings,
            self.hub,
            authenticate=self._authenticate,
            check=self._check if self.authenticator is not None else None,
        )
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
            try:  # an in-process plugin's NaN is refused here, not sent as null
                body = result_fragment({"ok": True, "result": result})
            except ProviderError as error:
                answer = answer_of(error)
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
    # Under the manifest's ``access`` a caller sees only what it may call
    # (``dispatcher.gateway.manifest_views``).

    async def plugins(self, request: web.Request) -> web.Response:
        """``GET /v1/plugins``: the plugins and methods the caller may call."""
        try:
            view = self.views.of(await self._authenticate(request))
        except DispatchError as error:
            return error_answer(error)
        return web.Response(body=view.plugins, content_type=_JSON)

    async def openapi(self, request: web.Request) -> web.Response:
        """``GET /openapi.json``: the document of the methods the caller may call."""
        try:
            view = self.views.of(await self._authenticate(request))
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
            view = self.views.of(principal)
        except DispatchError as error:
            return error_answer(error)
        telemetry = self.dispatcher.telemetry
        if telemetry is None:
            return web.json_response({"counts": [], "recent": [], "enabled": False})
        snapshot = telemetry.errors.snapshot()
        caller = principal.id if principal is not None else None
        counts = snapshot["counts"]
        if view is not self.views.everything:
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
    app.router.add_get("/v1/plugins/connect", gateway.sockets.connect_plugin, allow_head=False)
    app.router.add_get("/v1/events", gateway.sockets.events, allow_head=False)
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
    app.router.add_get("/v1/rollouts", gateway.rollouts.rollouts, allow_head=False)
    app.router.add_post("/v1/rollouts/{plugin}/{action}", gateway.rollouts.control_rollout)
    app.router.add_get("/healthz", gateway.healthz)
    app.router.add_get("/readyz", gateway.readyz)
    app.router.add_route("*", "/{tail:.*}", gateway.no_route)
    app.on_shutdown.append(gateway.sockets.close_streams)
    app.on_cleanup.append(gateway.sockets.close_rechecks)
    return app


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
