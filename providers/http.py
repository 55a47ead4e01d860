"""HTTP functions: POST the JSON envelope to a URL (``docs/protocol.md``).

Calls go through the client seam (``providers._http_client``): ``client: aiohttp`` (one
keep-alive session per provider carries every target without a ``pool:`` of its own) or
``client: reqwest`` (Rust's reqwest via pyreqwest, one pool per target; the ``reqwest``
extra, a manifest naming it without pyreqwest installed is refused at load). Unset, the
provider's default (``DEFAULT_CLIENT``, aiohttp: it says why). Measured on one fixed-reply server
(``bench/bench_http_clients.py``, ``docs/architecture.md``): reqwest makes more calls/s at
concurrency 64 for less CPU per call; httpx was 16x slower than aiohttp and is not offered.
Each client is imported when a target first uses it, not when the module loads.
``pool: {max_connections, max_per_host, idle_timeout_s}`` sizes a target's own pool.

What a target holds (its route, a client of its own, what the shared client keeps for its
URLs) is let go when the last plugin attached to it is detached: an instance that left its
fleet, a URL a reload moved a plugin off (``providers._http_common.TargetRoutes``). A call
still under way on a client so closed ends as ``TargetUnavailable``; a call that comes
later builds the route again. ``held()`` says what is held now.

Credentials: ``user:password@`` in the URL is sent as ``Authorization: Basic`` and taken
out of the URL before aiohttp sees it (so no message of aiohttp's can print it);
``bearer_token`` as ``Authorization: Bearer``. Two sources of ``Authorization`` are
refused when the manifest loads. Every message names the URL with its password masked.
Connections go only where the manifest's ``egress`` allows (``providers.egress``): the
URL's host when the route is built, each resolved address before it is dialled.

Instances: ``instances: [{url: …, weight: …}, {dns: …}, {registry: …}, …]`` (instead of
``url``, or besides it: ``url`` is then the first instance) makes the target a fleet.
``instance_targets()`` expands the fixed ones, ``instance_at`` the ones discovery finds
(``providers.discovery``), into single-URL ``HttpTarget``s sharing everything else; the
dispatcher's fleet (``dispatcher.fleet``) picks one per call and hands it to ``invoke``,
which is unchanged.

A call that provably never reached the target (the connection could not be opened: refused,
unreachable, TLS handshake failed) raises ``TargetUnavailable`` with
``details["stage"] == "connect"``: the fleet may send it to another instance, whatever the
method. Any later failure may have reached the plugin and carries no such marker.

Status mapping, for answers that carry no error envelope:

    200             decode the envelope (a plugin error is ``ok: false`` inside a 200)
    3xx             ProviderError naming the Location: redirects are never followed (a
                    redirect would carry the envelope and the headers' secrets elsewhere)
    401 / 403       Unauthorized / Forbidden
    408 / 504       DeadlineExceeded
    413             InvalidParams (request too large)
    429             RateLimited, with Retry-After
    500 502 503     TargetUnavailable (retryable), with Retry-After
    other           ProviderError (the target breaks the contract or is misconfigured)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import orjson
from pydantic import AnyHttpUrl, Field, SecretStr, field_validator, model_validator

from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    ProviderError,
)
from linchkit_plugin.wire import encode_json
from providers._compression import (
    HttpCompression,
    Negotiation,
    decoded,
    post_compressed,
    request_headers,
)
from providers._headers import BaseUrl, HeaderFields, RequestPath, checked_token
from providers._http_client import (
    DEFAULT_CLIENT,
    HTTP2_DESCRIPTION,
    ChosenClient,
    ClientKind,
    ConnectionCheck,
    HttpClient,
    HttpPool,
    Reply,
    checked_http2,
)
from providers._http_common import (
    HeldRoutes,
    HttpClients,
    TargetRoutes,
    basic_authorization,
    redirect_detail,
    served_at,
    status_error,
)
from providers.base import CONNECT_STAGE, Health, Provider
from providers.discovery import Weight, instance_item
from providers.envelope import decode_batch_response, decode_response
from providers.instances import InstanceListing
from providers.invocation import Invocation, Outcome, running_loop_time
from providers.target import (
    Balance,
    Destination,
    HealthCheck,
    OutlierDetection,
    PluginInfo,
    StrictModel,
    masked_url,
)
from providers.tls import ClientTls, ClientTlsContext

__all__ = [
    "CONNECT_STAGE",
    "DEFAULT_CLIENT",
    "HeldRoutes",
    "HttpInstance",
    "HttpPool",
    "HttpProvider",
    "HttpTarget",
]


class HttpInstance(StrictModel):
    """One instance of an HTTP fleet."""

    url: BaseUrl
    weight: Weight = 1


class HttpTarget(InstanceListing):
    """``provider: http``: an HTTP endpoint speaking the dispatcher envelope."""

    address_field = "url"
    instance_key = "url"
    address_noun = "a url"

    provider: Literal["http"]
    url: BaseUrl | None = Field(
        default=None, description="Base URL of the function, e.g. http://127.0.0.1:8081"
    )
    instances: list[instance_item(HttpInstance)] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="Several interchangeable servers of the function (a fleet): fixed URLs,"
        " DNS names, an etcd registry; url, if set, is the first.",
    )
    balance: Balance = "least_request"
    health_check: HealthCheck | None = None
    outlier: OutlierDetection = Field(default_factory=OutlierDetection)
    invoke_path: RequestPath = "/invoke"
    health_path: RequestPath = "/health"
    headers: HeaderFields = Field(default_factory=dict)
    bearer_token: SecretStr | None = None
    batch: bool = Field(default=True, description="The endpoint accepts the batch envelope.")
    max_response_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    tls: ClientTls | None = Field(
        default=None,
        description="Verify the server with ca_file, present cert_file/key_file (mTLS);"
        " https URLs only.",
    )
    client: ChosenClient = Field(
        default=None,
        description="The HTTP client of this target's calls: aiohttp or reqwest (the"
        " reqwest extra); default: the provider's (aiohttp).",
    )
    pool: HttpPool | None = Field(
        default=None,
        description="A connection pool of this target's own, sized for its concurrency;"
        " default: the provider's shared pool (512 connections).",
    )
    http2: bool = Field(default=False, description=HTTP2_DESCRIPTION)
    compression: HttpCompression = Field(
        default_factory=HttpCompression,
        description="Compress large request envelopes where the plugin accepts it, and"
        " accept compressed answers (providers._compression).",
    )

    secret_fields = frozenset({"headers"})

    _bearer_token_fits_a_header = field_validator("bearer_token")(checked_token)

    @model_validator(mode="after")
    def _tls_needs_https(self) -> HttpTarget:
        if self.tls is not None:
            plain = [str(url) for url in self._urls() if url.scheme != "https"]
            if plain:
                raise ValueError(f"tls is set but {masked_url(plain[0])} is not https")
        return self

    @model_validator(mode="after")
    def _http2_needs_reqwest(self) -> HttpTarget:
        checked_http2(self.http2, self.client)
        return self

    @model_validator(mode="after")
    def _one_source_of_credentials(self) -> HttpTarget:
        sources = [
            name
            for name, present in (
                (
                    "user:password in url",
                    any(url.username or url.password for url in self._urls()),
                ),
                ("bearer_token", self.bearer_token is not None),
                (
                    "an Authorization header",
                    any(k.lower() == "authorization" for k in self.headers),
                ),
            )
            if present
        ]
        if len(sources) > 1:
            raise ValueError(
                f"credentials twice: {' and '.join(sources)} would both set the Authorization"
                " header; keep one"
            )
        return self

    def describe(self) -> str:
        places = self.fixed_places()
        if len(places) == 1 and not self.instance_sources():
            return f"http {masked_url(places[0][0]).rstrip('/')}{self.invoke_path}"
        listing = self.listing(lambda url: masked_url(url).rstrip("/"))
        return f"http fleet {listing} {self.invoke_path}"

    def endpoint(self, path: str) -> str:
        if self.url is None or self.instances:
            raise ProviderError(
                f"{self.describe()} is a fleet: the dispatcher calls one of its instances"
            )
        return str(self.url).rstrip("/") + path

    def destinations(self) -> tuple[Destination, ...]:
        return self.listed_destinations(Destination.of_url)

    def _urls(self) -> list[AnyHttpUrl]:
        head = [] if self.url is None else [self.url]
        return head + [i.url for i in self.instances if isinstance(i, HttpInstance)]


class _Route:
    """What ``invoke`` needs of a target, computed once: URLs, final headers, TLS, client."""

    __slots__ = (
        "client",
        "describe_url",
        "headers",
        "health_url",
        "invoke_url",
        "negotiation",
        "tls",
    )

    def __init__(self, target: HttpTarget, open_client: Callable[[], HttpClient]) -> None:
        from yarl import URL

        invoke_url = URL(target.endpoint(target.invoke_path))
        authorization = basic_authorization(invoke_url)
        self.invoke_url = str(invoke_url.with_user(None))
        self.health_url = str(URL(target.endpoint(target.health_path)).with_user(None))
        self.describe_url = str(URL(target.endpoint("/describe")).with_user(None))
        headers = {"Content-Type": "application/json", **target.headers}
        if authorization is not None:
            headers["Authorization"] = authorization
        if target.bearer_token is not None:
            headers["Authorization"] = f"Bearer {target.bearer_token.get_secret_value()}"
        self.negotiation = Negotiation(target.compression, host=invoke_url.host or "")
        self.headers = request_headers(headers, self.negotiation)
        #: None: the client's default verification against the system's roots.
        self.tls = None if target.tls is None else ClientTlsContext(target.tls)
        # Last, once nothing above can fail (TLS files unreadable now): a client of the
        # target's own opened before a failure was left open, one more per call.
        self.client = open_client()

    @property
    def urls(self) -> tuple[str, ...]:
        return self.invoke_url, self.health_url, self.describe_url


class HttpProvider(Provider[HttpTarget]):
    name = "http"
    target_model = HttpTarget
    delivers_events = False  # no channel from the plugin back to the host
    native_batch = True

    def __init__(
        self,
        *,
        max_connections: int = 512,
        keepalive_seconds: float = 30.0,
        unix_socket: str | None = None,
        client: ClientKind = DEFAULT_CLIENT,
        connection_check: ConnectionCheck | None = None,
    ) -> None:
        """``unix_socket``: send every request over this socket (the docker provider's
        sandboxed containers listen on one); the URL then only names the host, and every
        call goes through aiohttp (the one client that dials a Unix socket).
        ``client``: the client of targets that name none. ``connection_check``: asked
        before each new connection and again once it is open, nothing sent yet, to refuse
        it (``ConnectionCheck``; aiohttp then too)."""
        self._default_client = client
        self._shared_pool = HttpPool(
            max_connections=max_connections, idle_timeout_s=keepalive_seconds
        )
        self._unix_socket = unix_socket
        self._connection_check = connection_check
        self._clients: HttpClients | None = None
        self._targets: TargetRoutes[_Route] = TargetRoutes()
        #: The same dict as ``_targets.routes``, read once per call.
        self._routes = self._targets.routes
        #: The running loop's clock. ``start`` binds it: ``asyncio.get_running_loop()``
        #: costs 0.14 µs a call on Python 3.11 (it asks the kernel for the process id each
        #: time, to notice a fork), 0.04 µs bound, and ``invoke`` reads it on every call.
        self._loop_time: Callable[[], float] = running_loop_time

    async def start(self) -> None:
        # Here, not in __init__: the manifest's egress policy is set between the two.
        self._clients = HttpClients(
            self._default_client,
            self._shared_pool,
            egress=self.egress,
            unix_socket=self._unix_socket,
            connection_check=self._connection_check,
        )
        self._loop_time = asyncio.get_running_loop().time

    async def aclose(self) -> None:
        clients, self._clients = self._clients, None
        self._targets.clear()
        self._loop_time = running_loop_time  # a later start may be in another loop
        if clients is not None:
            await clients.aclose()

    async def attach(self, plugin: PluginInfo, target: HttpTarget) -> None:
        """Count ``plugin`` among those calling ``target``; its route is built by the
        first call, as for a target called without an attach."""
        self._targets.attach(target.key)

    async def detach(self, plugin: PluginInfo, target: HttpTarget) -> None:
        """Once no plugin is attached to ``target`` any more, drop its route and release
        its clients (``HttpClients.release``)."""
        await self._targets.release(target.key, self._clients)

    def held(self) -> HeldRoutes:
        """What the provider holds for its targets now (routes, clients, per-URL state)."""
        return self._targets.held(self._clients)

    async def invoke(self, target: HttpTarget, invocation: Invocation) -> Any:
        # The hot path (bench/bench_http.py, bench_hot_path.py): one clock reading serves
        # the envelope's deadline_ms and the client's timeout; ``_post`` is written out
        # here, and so is ``post_compressed`` for a body that goes plain (each one coroutine
        # layer less on every resumption of the call).
        now = self._loop_time()
        remaining = invocation.deadline - now
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline passed before calling {target.describe()}")
        data = invocation.request_json(now)
        route = self._routes.get(target.key) or self._route(target)
        negotiation = route.negotiation
        try:
            if negotiation.compresses(len(data)):
                reply = await post_compressed(
                    route.client,
                    negotiation,
                    route.invoke_url,
                    data,
                    route.headers,
                    timeout=remaining,
                    limit=target.max_response_bytes,
                    target=target,
                    tls=route.tls,
                )
            else:
                reply = await route.client.post(
                    route.invoke_url,
                    data,
                    route.headers,
                    timeout=remaining,
                    limit=target.max_response_bytes,
                    target=target,
                    tls=route.tls,
                )
                if not negotiation.answered_plain(reply):
                    reply = await decoded(reply, negotiation, target.max_response_bytes, target)
        except TimeoutError:
            raise _late(target, remaining) from None
        return decode_response(_answer(reply, target))

    async def invoke_batch(
        self, target: HttpTarget, invocations: Sequence[Invocation]
    ) -> list[Outcome[Any]]:
        if not target.batch:
            return await super().invoke_batch(target, invocations)
        # The batch ends at its earliest deadline; each item carries its own deadline_ms.
        now = asyncio.get_running_loop().time()
        earliest = min(invocation.deadline for invocation in invocations)
        body = {"batch": [invocation.request_wire(now) for invocation in invocations]}
        payload = await self._post(target, body, earliest - now)
        return decode_batch_response(payload, len(invocations))

    async def health(self, target: HttpTarget) -> Health:
        started = time.perf_counter()
        try:
            route = self._route(target)
            reply = await route.client.get(
                route.health_url,
                route.headers,
                timeout=5,
                limit=4096,
                target=target,
                tls=route.tls,
            )
        except TimeoutError:
            return Health("not_serving", f"{target.describe()} did not answer within 5 s")
        except DispatchError as error:  # unreachable, or the egress policy refused it
            return Health("not_serving", error.message)
        latency_ms = (time.perf_counter() - started) * 1000
        detail = redirect_detail(reply.status, reply.headers.get("Location")) or reply.body[
            :200
        ].decode("utf-8", "replace")
        status: Literal["serving", "not_serving"] = (
            "serving" if reply.status == 200 else "not_serving"
        )
        return Health(status, detail, latency_ms)

    async def served_methods(
        self, plugin: PluginInfo, target: HttpTarget, *, timeout: float
    ) -> frozenset[str] | None:
        """``GET /describe`` of the target's server, asked each time (the server may be
        redeployed under the dispatcher); a function server without it says nothing."""
        try:
            route = self._route(target)
        except DispatchError:
            return None
        return await served_at(
            route.client,
            route.describe_url,
            route.headers,
            timeout=timeout,
            target=target,
            tls=route.tls,
        )

    async def _post(self, target: HttpTarget, body: dict[str, Any], remaining: float) -> Any:
        """POST ``body`` with ``remaining`` seconds to answer; the decoded JSON answer."""
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline passed before calling {target.describe()}")
        data = encode_json(body)
        route = self._routes.get(target.key) or self._route(target)
        try:
            reply = await post_compressed(
                route.client,
                route.negotiation,
                route.invoke_url,
                data,
                route.headers,
                timeout=remaining,
                limit=target.max_response_bytes,
                target=target,
                tls=route.tls,
            )
        except TimeoutError:
            raise _late(target, remaining) from None
        return _answer(reply, target)

    def _route(self, target: HttpTarget) -> _Route:
        route = self._routes.get(target.key)
        if route is None:
            clients = self._clients
            if clients is None:
                raise ProviderError(
                    "the http provider is not started (use the Dispatcher as a context manager)"
                )
            # Names are checked again after resolution (by the client); an address literal
            # is never resolved, so this is where it is checked.
            for destination in target.destinations():
                self.egress.check(destination)
            route = self._routes[target.key] = _Route(
                target,
                partial(clients.for_target, target.client, target.pool, http2=target.http2),
            )
        return route

    def __repr__(self) -> str:
        return f"<HttpProvider {self._targets!r} clients={self._clients!r}>"


def _late(target: HttpTarget, remaining: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"{target.describe()} did not answer within {remaining * 1000:.0f} ms")


def _answer(reply: Reply, target: HttpTarget) -> Any:
    """The decoded JSON of a 200 answer; any other status as the seam's error."""
    if reply.status == 200:
        return _json(reply.body, target)
    headers = reply.headers
    raise status_error(
        reply.status,
        reply.body,
        headers.get("Retry-After"),
        target,
        location=headers.get("Location"),
    )


def _json(payload: bytes, target: HttpTarget) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ProviderError(
            f"{target.describe()} answered a body that is not JSON: {payload[:80]!r}"
        ) from None
