"""The client seam of the providers that POST over HTTP: one small base class, two clients.

``providers.http`` and ``providers.knative`` ask an ``HttpClient`` for one thing on their
hot path: POST these bytes to this URL, with these headers, within this many seconds,
reading at most this many bytes of answer. Two clients implement it:

* ``aiohttp`` (``providers._aiohttp.AiohttpClient``): the pure-asyncio client, one
  keep-alive pool per provider (or per target with its own ``pool:``). The only client
  that dials a Unix socket, and the one streams, SSE and WebSocket stay on.
* ``reqwest`` (``providers._reqwest.ReqwestClient``): Rust's reqwest/hyper through
  pyreqwest, one pool per target. Measured on the fixed-reply server
  (``bench/bench_http_clients.py``, ``docs/architecture.md``): more calls/s at
  concurrency 64 for less CPU per call, every thread of the process counted. pyreqwest is
  an extra (``pip install 'linchkit-dispatcher[reqwest]'``): a manifest that asks for
  ``client: reqwest`` without it is refused when it loads (``ChosenClient``).

What every client guarantees, so the providers above it never see a vendor exception:

    TimeoutError          the call did not finish within ``timeout`` (the provider turns
                          it into DeadlineExceeded naming the target)
    TargetUnavailable     details["stage"] == "connect": the connection could not be
                          opened (no byte of the request went out); otherwise the call
                          failed mid-way and may have reached the plugin. TLS failures
                          carry details["tls"] (server_certificate, handshake,
                          client_certificate_refused, closed_without_answer)
    EgressRefused         the manifest's egress policy refused every address
    ProviderError         the answer was larger than ``limit`` bytes

Redirects are never followed by either client: a 3xx comes back as a ``Reply`` with its
``Location`` header, for the provider to refuse (``providers._http_common.status_error``).

A client that was closed (``aclose``, or the client of a target's own when the last plugin
attached to the target is detached) refuses a call with ``TargetUnavailable``, and one it
carried when it closed ends so too: never a vendor's "closed" error.

A ``ConnectionCheck`` (aiohttp only) is asked before each new connection is opened, and
again once it is open, before a byte of the request is written; the ``DispatchError`` it
raises reaches the caller as it is, and nothing of the request goes out.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from types import TracebackType
from typing import Annotated, Any, Literal, NamedTuple, Protocol, Self

from pydantic import AfterValidator, Field

from linchkit_plugin.errors import TargetUnavailable
from providers.base import CONNECT_STAGE
from providers.target import StrictModel, TargetConfig
from providers.tls import ClientTlsContext

__all__ = [
    "DEFAULT_CLIENT",
    "HTTP2_DESCRIPTION",
    "REQWEST_MISSING",
    "ChosenClient",
    "ClientKind",
    "ConnectionCheck",
    "HttpClient",
    "HttpPool",
    "Reply",
    "checked_http2",
    "closed_client",
]

#: Which client a target's calls go through (``client:`` of an http or knative target).
ClientKind = Literal["aiohttp", "reqwest"]
#: The client of a target that names none. aiohttp, although reqwest is faster
#: (docs/architecture.md): pyreqwest 0.15 cannot end a call that is cancelled before its
#: answer arrives. It runs each request as a tokio task of its own and, on cancel, drops
#: that task's JoinHandle (which detaches it) instead of aborting it, so the connection
#: stays open until the plugin answers or the request's timeout fires: a plugin never
#: learns that a hedge lost or a caller gave up, and the connections of calls a drain cut
#: off outlive ``aclose``. Nothing in its Python API reaches that task (``Client.close``
#: only wakes the awaiting side). ``client: reqwest`` chooses it per target, where the
#: speed matters more than telling the plugin about abandoned calls.
DEFAULT_CLIENT: ClientKind = "aiohttp"
#: Why a manifest naming ``client: reqwest`` is refused where pyreqwest is not installed.
REQWEST_MISSING = (
    "client: reqwest needs pyreqwest, which is not installed:"
    " pip install 'linchkit-dispatcher[reqwest]' (or leave client unset for aiohttp)"
)


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (nor its native library)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules (set to None)
        return False


def _available(kind: ClientKind | None) -> ClientKind | None:
    if kind == "reqwest" and not _installed("pyreqwest"):
        raise ValueError(REQWEST_MISSING)
    return kind


#: ``client:`` of an http or knative target: a client this installation has, or unset.
ChosenClient = Annotated[ClientKind | None, AfterValidator(_available)]

#: What ``http2:`` of an http target says, for its field's description.
HTTP2_DESCRIPTION = (
    "Speak HTTP/2 only, without negotiating (h2c on http://, h2 on https://): the calls in"
    " flight share a connection instead of holding one each. The server must speak it"
    " (hypercorn, Go's net/http with unencrypted HTTP/2); client: reqwest only."
)


def checked_http2(http2: bool, client: ClientKind | None) -> None:
    """``http2: true`` (an http target's) is refused unless it names ``client: reqwest``: aiohttp
    speaks HTTP/1.1 only, and the provider's default client may be either."""
    if http2 and client != "reqwest":
        raise ValueError("http2: true needs client: reqwest (aiohttp speaks HTTP/1.1 only)")


def closed_client(where: str, *, sent: bool) -> TargetUnavailable:
    """A call on a client that was closed, as the seam's error: ``sent`` when the client
    closed under it (it may have reached the plugin), otherwise it went nowhere (the
    connect stage: a fleet may send it to another instance)."""
    why = (
        "its HTTP client was closed: no plugin is attached to the target any more (it left"
        " its fleet, or a reload took it out), or the dispatcher closed"
    )
    if sent:
        return TargetUnavailable(f"{where}: the call was cut off: {why}")
    return TargetUnavailable(f"{where}: not called: {why}", details=CONNECT_STAGE)


class HttpPool(StrictModel):
    """``pool:`` of an HTTP target: how many connections it may hold open, and how long.

    A target with ``pool`` gets a pool of its own (per-target pools); without, its calls
    share the provider's pool of 512 connections. ``max_connections`` bounds the calls in
    flight to the target: size it for the concurrency you expect (10,000 calls in flight
    to one slow target need 10,000 connections, and as many file descriptors).

    On ``reqwest`` every target URL has its own pyreqwest client, so the shared pool's 512
    apply per URL; ``max_connections`` bounds its requests in flight
    (``providers._in_flight``), and ``max_per_host`` the idle connections kept (reqwest
    has no other per-host cap).
    On ``aiohttp`` they are the connector's ``limit`` and ``limit_per_host``.
    """

    max_connections: int = Field(
        default=512, gt=0, le=1_000_000, description="Connections open at once, in all."
    )
    max_per_host: int = Field(
        default=0, ge=0, le=1_000_000, description="Connections to one host; 0: no limit."
    )
    idle_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Seconds an idle connection is kept."
    )


class Reply(NamedTuple):
    """What a target answered: status, headers (case-insensitive lookups), whole body.

    A named tuple, not a frozen dataclass: one is built per call, and it costs 0.22 µs
    against the dataclass's 0.62 µs (its generated ``__init__`` sets each field through
    ``object.__setattr__``); it is just as immutable.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes


class ConnectionCheck(Protocol):
    """Who a client may send a request to over a new connection: each method raises a
    ``DispatchError`` to refuse it (the docker provider's check of who listens on a
    container's port, then of who accepted the connection)."""

    async def before_connect(self) -> None:
        """The client is about to open a new connection."""

    async def connected(self, local: tuple[Any, ...] | None) -> None:
        """The new connection is open, from ``local`` (this end's address and port, as
        ``getsockname`` gives it; None when the connection closed meanwhile), and nothing
        was written to it yet; it is closed if this raises."""


class HttpClient(ABC):
    """POSTs for a provider; ends every connection and thread of its own in ``aclose``."""

    @abstractmethod
    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        timeout: float,
        limit: int,
        target: TargetConfig,
        tls: ClientTlsContext | None,
    ) -> Reply:
        """POST ``body``; the answer, or one of the errors in the module docstring."""

    @abstractmethod
    async def get(
        self,
        url: str,
        headers: Mapping[str, str],
        *,
        timeout: float,
        limit: int,
        target: TargetConfig,
        tls: ClientTlsContext | None,
    ) -> Reply:
        """GET (health checks): at most ``limit`` bytes of the body, never an error for more."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close every connection; the client is not used again."""

    async def forget(self, urls: Collection[str]) -> None:  # noqa: B027 - a client keeping nothing per URL skips it
        """No target calls ``urls`` through this client any more (the last plugin attached
        to it was detached): drop what the client keeps for each (reqwest: its pyreqwest
        client, closed, with its connections). A call to one of them later builds it
        again. The default keeps nothing per URL."""

    def urls_held(self) -> frozenset[str]:
        """The URLs the client keeps something for (``forget``); the default: none."""
        return frozenset()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
