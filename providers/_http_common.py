"""What the providers that speak HTTP share: their clients, status mapping, ``/describe``.

``providers.http`` and ``providers.knative`` both POST to an HTTP server and read what it
answers; these are the pieces they have in common, public in one place so neither provider
reaches into the other's privates. ``HttpClients`` opens each client kind's module when a
target first needs it (``providers._aiohttp``, ``providers._reqwest``).

What a target holds is let go once no plugin is attached to it (``TargetRoutes``): its
route, a client of its own (closed), and what a shared client keeps for its URLs that no
other target calls (``HttpClient.forget``). Without that, a fleet whose instances come
from DNS or a registry, or reloads moving a plugin from URL to URL, would grow the process
with every address they were ever given.

No client follows a redirect: a 3xx is ``ProviderError`` naming the ``Location`` (password
masked).

Status mapping, for answers that carry no error envelope (``status_error``):

    3xx             ProviderError naming the Location (never followed)
    401 / 403       Unauthorized / Forbidden
    408 / 504       DeadlineExceeded
    413             InvalidParams (request too large)
    429             RateLimited, with Retry-After
    500 502 503     TargetUnavailable (retryable), with Retry-After
    other           ProviderError (the target breaks the contract or is misconfigured)
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import orjson

from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    Forbidden,
    InvalidParams,
    ProviderError,
    RateLimited,
    TargetUnavailable,
    Unauthorized,
    bounded_retry_after,
    error_from_wire,
)
from providers._http_client import (
    REQWEST_MISSING,
    ClientKind,
    ConnectionCheck,
    HttpClient,
    HttpPool,
)
from providers.egress import EgressPolicy
from providers.served import served_names
from providers.target import TargetConfig, masked_url
from providers.tls import ClientTlsContext

if TYPE_CHECKING:
    from yarl import URL

__all__ = [
    "HeldRoutes",
    "HttpClients",
    "HttpRoute",
    "TargetRoutes",
    "basic_authorization",
    "envelope_error",
    "redirect_detail",
    "retry_after_seconds",
    "served_at",
    "status_error",
]

#: The most of a ``GET /describe`` answer read: room for ``MAX_SERVED_METHODS`` names of
#: a usual length; a longer answer is cut there, is no JSON, and says nothing.
DESCRIBE_LIMIT = 1024 * 1024


class HttpClients:
    """The clients of one provider: a shared one per kind, and one per target with a ``pool``.

    Opened lazily, when a target first needs one (so pyreqwest is imported only by a
    dispatcher that uses it); a target's own is closed once no plugin is attached to the
    target (``release``), every one still open in ``aclose``.
    """

    __slots__ = (
        "_connection_check",
        "_default",
        "_egress",
        "_own",
        "_shared",
        "_shared_pool",
        "_unix_socket",
    )

    def __init__(
        self,
        default: ClientKind,
        shared_pool: HttpPool,
        *,
        egress: EgressPolicy,
        unix_socket: str | None = None,
        connection_check: ConnectionCheck | None = None,
    ) -> None:
        # aiohttp is the one client that dials a Unix socket, and that lets a check run
        # before each new connection and once it is open.
        forced = unix_socket is not None or connection_check is not None
        self._default: ClientKind = "aiohttp" if forced else default
        self._shared_pool = shared_pool
        self._egress = egress
        self._unix_socket = unix_socket
        self._connection_check = connection_check
        self._shared: dict[tuple[ClientKind, bool], HttpClient] = {}
        self._own: set[HttpClient] = set()

    def for_target(
        self,
        kind: ClientKind | None,
        pool: HttpPool | None,
        *,
        http2: bool = False,
        authority: str | None = None,
    ) -> HttpClient:
        """The client of a target that asks for ``kind`` (None: the default) and ``pool``,
        speaking HTTP/2 only when ``http2`` (reqwest alone can: the manifest checks it).
        ``authority``: the host its requests name instead of the URL's, whose address
        they still go to (a Knative service behind its ingress, on HTTP/2): a client of
        the target's own."""
        forced = self._unix_socket is not None or self._connection_check is not None
        chosen = self._default if kind is None or forced else kind
        if http2 and chosen != "reqwest":
            raise ProviderError(
                "http2 needs client: reqwest, and this provider's calls go through aiohttp"
                + (" (it dials a Unix socket)" if self._unix_socket is not None else "")
            )
        if pool is not None or authority is not None:
            client = self._open(chosen, pool or self._shared_pool, http2, authority)
            self._own.add(client)
            return client
        shared = self._shared.get((chosen, http2))
        if shared is None:
            shared = self._shared[chosen, http2] = self._open(
                chosen, self._shared_pool, http2, None
            )
        return shared

    async def release(self, route: HttpRoute, kept: Iterable[HttpRoute]) -> None:
        """No plugin is attached to ``route``'s target any more: close its client if it is
        the target's own (a call still on it ends as ``TargetUnavailable``); on a shared
        client, drop what it keeps for the URLs of ``route`` that none of ``kept`` (the
        routes still kept) calls through it."""
        client = route.client
        if client in self._own:
            self._own.discard(client)
            await client.aclose()
        elif client in self._shared.values():  # else closed already, with the provider
            used = {url for other in kept if other.client is client for url in other.urls}
            await client.forget([url for url in route.urls if url not in used])

    @property
    def own_clients(self) -> int:
        """Clients of a target's own, open."""
        return len(self._own)

    def urls_held(self) -> frozenset[str]:
        """The URLs some client keeps something for (``HttpClient.urls_held``)."""
        return frozenset().union(
            *(client.urls_held() for client in (*self._shared.values(), *self._own))
        )

    async def aclose(self) -> None:
        clients = [*self._shared.values(), *self._own]
        self._shared.clear()
        self._own.clear()
        for client in clients:
            await client.aclose()

    def _open(
        self, kind: ClientKind, pool: HttpPool, http2: bool, authority: str | None
    ) -> HttpClient:
        if kind == "reqwest":
            try:
                from providers._reqwest import ReqwestClient
            except ImportError as error:  # a host chose it by hand (the manifest checks it)
                raise ProviderError(f"{REQWEST_MISSING} ({error})") from None
            return ReqwestClient(pool, egress=self._egress, http2=http2, authority=authority)
        if authority is not None:
            raise ProviderError("a request authority other than the URL's needs client: reqwest")
        from providers._aiohttp import AiohttpClient

        return AiohttpClient(
            pool,
            egress=self._egress,
            unix_socket=self._unix_socket,
            connection_check=self._connection_check,
        )

    def __repr__(self) -> str:
        shared = [f"{kind}+h2" if http2 else kind for kind, http2 in self._shared]
        return f"<HttpClients default={self._default} shared={shared} own={len(self._own)}>"


class HttpRoute(Protocol):
    """What ``TargetRoutes`` and ``HttpClients.release`` read of a provider's route."""

    @property
    def client(self) -> HttpClient:
        """The client the target's calls go through."""

    @property
    def invoke_url(self) -> str:
        """Where a call goes."""

    @property
    def urls(self) -> tuple[str, ...]:
        """Every URL the route calls (a call, the health probe, ``/describe``)."""


RouteT = TypeVar("RouteT", bound=HttpRoute)


@dataclass(frozen=True, slots=True)
class HeldRoutes:
    """What a provider speaking HTTP holds for its targets now (``HttpProvider.held``,
    ``KnativeProvider.held``), read-only: once the last plugin attached to a target is
    detached, none of it is that target's any more."""

    #: The URL each kept route calls, sorted: one per target a call or a probe needed
    #: since its last release (two targets may call one URL).
    routes: tuple[str, ...]
    #: Targets some plugin is attached to (two plugins on one target count once).
    attached: int
    #: Clients of a target's own (a ``pool:``, a Knative service's ``authority``), open.
    own_clients: int
    #: The URLs a client keeps something for (reqwest: a pyreqwest client each).
    client_urls: frozenset[str]


class TargetRoutes(Generic[RouteT]):
    """A provider's routes by target key, and how many attachments hold each target.

    ``routes`` is what a call reads (one ``dict.get`` on the hot path); the provider puts a
    target's route there when a call first needs it, attached or not. Each ``attach`` of a
    plugin to a target counts (several plugins, or a rollout's two versions, on one target
    share its route); the ``detach`` that ends the last takes the route out and hands it
    back, for the provider to release its clients (``HttpClients.release``). A call that
    comes later (a late one, or a host's that never attached) builds the route again: it
    is then kept until the target's next last detach, or the provider's close.
    """

    __slots__ = ("_attached", "routes")

    def __init__(self) -> None:
        self.routes: dict[str, RouteT] = {}
        self._attached: dict[str, int] = {}

    def attach(self, key: str) -> None:
        self._attached[key] = self._attached.get(key, 0) + 1

    def detach(self, key: str) -> RouteT | None:
        """One attachment of target ``key`` ended: the target's route, taken out, when it
        was the last (None: another holds the target, no call built its route, or it was
        never attached, whose routes this does not end)."""
        count = self._attached.get(key)
        if count is None:
            return None
        if count > 1:
            self._attached[key] = count - 1
            return None
        del self._attached[key]
        return self.routes.pop(key, None)

    def holds(self, key: str) -> bool:
        """Whether some plugin is attached to target ``key``."""
        return key in self._attached

    async def release(self, key: str, clients: HttpClients | None) -> None:
        """``detach``, then let ``clients`` go of what the target's route held when it was
        the last attachment (``HttpClients.release``)."""
        route = self.detach(key)
        if route is not None and clients is not None:
            await clients.release(route, self.routes.values())

    def held(self, clients: HttpClients | None) -> HeldRoutes:
        return HeldRoutes(
            routes=tuple(sorted(route.invoke_url for route in self.routes.values())),
            attached=len(self._attached),
            own_clients=0 if clients is None else clients.own_clients,
            client_urls=frozenset() if clients is None else clients.urls_held(),
        )

    def clear(self) -> None:
        self.routes.clear()
        self._attached.clear()

    def __repr__(self) -> str:
        return f"<TargetRoutes routes={len(self.routes)} attached={len(self._attached)}>"


def basic_authorization(url: URL) -> str | None:
    """The ``Authorization: Basic`` value of ``user:password@`` in ``url``; None without.

    Sent as a header so the URL handed to aiohttp carries no credentials at all.
    """
    if url.user is None and url.password is None:
        return None
    pair = f"{url.user or ''}:{url.password or ''}".encode()  # RFC 7617, UTF-8
    return "Basic " + base64.b64encode(pair).decode("ascii")


def redirect_detail(status: int, location: str | None) -> str | None:
    """What a 3xx answer says, for messages: where it points (password masked)."""
    if not 300 <= status < 400:
        return None
    where = masked_url(location) if location else "nowhere (no Location)"
    return (
        f"answered a redirect (HTTP {status}) to {where}, not followed:"
        " point the target at the final URL"
    )


def status_error(
    status: int,
    payload: bytes,
    retry_after_header: str | None,
    target: TargetConfig,
    *,
    location: str | None = None,
) -> DispatchError:
    """The error an answer other than 200 stands for: its error envelope, or its status."""
    redirect = redirect_detail(status, location)
    if redirect is not None:
        return ProviderError(f"{target.describe()} {redirect}")
    retry_after = retry_after_seconds(retry_after_header)
    error = envelope_error(payload)
    if error is not None:
        if retry_after is not None and error.retry_after is None:
            return error.with_retry_after(retry_after)
        return error
    where = target.describe()
    if status == 401:
        return Unauthorized(f"{where} refused the credentials (401)")
    if status == 403:
        return Forbidden(f"{where} forbids this call (403)")
    if status in (408, 504):
        return DeadlineExceeded(f"{where} timed out ({status})")
    if status == 413:
        return InvalidParams(f"{where} refused the request as too large (413)")
    if status == 429:
        return RateLimited(f"{where} is throttling calls (429)", retry_after=retry_after)
    if status in (500, 502, 503):
        return TargetUnavailable(f"{where} failed with HTTP {status}", retry_after=retry_after)
    return ProviderError(f"{where} answered HTTP {status}: {payload[:120]!r}")


def envelope_error(payload: bytes) -> DispatchError | None:
    """The error of an ``ok: false`` response envelope; None if ``payload`` is not one."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if isinstance(body, dict) and body.get("ok") is False and "error" in body:
        return error_from_wire(body["error"])
    return None


def retry_after_seconds(header: str | None) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) as seconds from now, believed
    as far as ``bounded_retry_after`` believes a peer (``inf`` parses as a float)."""
    if not header:
        return None
    try:
        return bounded_retry_after(max(0.0, float(header)))
    except ValueError:
        pass
    try:
        return bounded_retry_after(
            max(0.0, parsedate_to_datetime(header).timestamp() - time.time())
        )
    except (TypeError, ValueError):
        return None


async def served_at(
    client: HttpClient,
    url: str,
    headers: Mapping[str, str],
    *,
    timeout: float,
    target: TargetConfig,
    tls: ClientTlsContext | None,
) -> frozenset[str] | None:
    """The methods a plugin server's ``GET /describe`` lists (``docs/protocol.md``), or
    None: any other answer (a function server without ``/describe`` answers 404), no
    answer within ``timeout``, or a list ``providers.served`` does not believe."""
    try:
        reply = await client.get(
            url,
            {**headers, "Accept-Encoding": "identity"},  # a plain body, whatever its size
            timeout=timeout,
            limit=DESCRIBE_LIMIT,
            target=target,
            tls=tls,
        )
    except (TimeoutError, DispatchError):
        return None
    if reply.status != 200:
        return None
    try:
        described = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        return None
    methods = described.get("methods") if isinstance(described, dict) else None
    return served_names(methods) if isinstance(methods, list) else None
