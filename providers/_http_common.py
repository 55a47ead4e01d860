"""What the providers that speak HTTP share: the client session, bounded reads, status mapping.

``providers.http`` and ``providers.knative`` both POST to an HTTP server and read what it
answers; these are the pieces they have in common, public in one place so neither provider
reaches into the other's privates. aiohttp is imported only when a session is opened.

Every request on these sessions passes ``allow_redirects=False``: a redirect would re-send
the envelope and the target's secret headers to wherever a target (or whoever answers in
its place) points, including a metadata address. A 3xx is ``ProviderError`` naming the
``Location`` (password masked). The session's resolver enforces the egress policy on every
address a name resolves to (``providers._egress_resolver``).

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
import errno
import os
import ssl
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from types import SimpleNamespace
from typing import TYPE_CHECKING

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
    error_from_wire,
)
from providers._http_client import (
    REQWEST_MISSING,
    ClientKind,
    ConnectionCheck,
    HttpClient,
    HttpPool,
    Reply,
)
from providers.base import CONNECT_STAGE
from providers.egress import EgressPolicy
from providers.served import served_names
from providers.target import TargetConfig, masked_url
from providers.tls import ClientTls, ClientTlsContext

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

__all__ = [
    "AiohttpClient",
    "HttpClients",
    "basic_authorization",
    "connect_error",
    "envelope_error",
    "in_flight_error",
    "open_session",
    "read_limited",
    "redirect_detail",
    "retry_after_seconds",
    "served_at",
    "status_error",
]

#: The most of a ``GET /describe`` answer read: room for ``MAX_SERVED_METHODS`` names of
#: a usual length; a longer answer is cut there, is no JSON, and says nothing.
DESCRIBE_LIMIT = 1024 * 1024


def open_session(
    *,
    max_connections: int,
    keepalive_seconds: float,
    egress: EgressPolicy,
    unix_socket: str | None = None,
    max_per_host: int = 0,
    before_connect: ConnectionCheck | None = None,
) -> aiohttp.ClientSession:
    """One keep-alive pool for every target of a provider; no automatic headers, no decoding.

    Names resolve through ``egress``: forbidden addresses are never dialled, and a name
    left with none raises ``EgressRefused`` out of the request. Address literals skip
    resolution in aiohttp: callers check those themselves (``EgressPolicy.check``).
    ``unix_socket``: send every request over this socket (a socket the provider was given
    in code, not one from the manifest); the URL then only names the host.
    ``before_connect``: awaited before each new connection (``ConnectionCheck``).
    """
    import aiohttp

    from providers._egress_resolver import EgressResolver

    connector: aiohttp.BaseConnector
    if unix_socket is not None:
        connector = aiohttp.UnixConnector(
            unix_socket, limit=max_connections, keepalive_timeout=keepalive_seconds
        )
    else:
        connector = aiohttp.TCPConnector(
            limit=max_connections,
            limit_per_host=max_per_host,
            keepalive_timeout=keepalive_seconds,
            resolver=EgressResolver(egress),
        )
    # No Accept-Encoding unless a call sets one (providers._compression decides, and
    # decodes what comes back with its size capped): aiohttp would otherwise offer gzip on
    # every request, and a plugin would answer in a coding this target never chose.
    return aiohttp.ClientSession(
        connector=connector,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        auto_decompress=False,
        trace_configs=None if before_connect is None else [_checked_connections(before_connect)],
    )


def _checked_connections(check: ConnectionCheck) -> aiohttp.TraceConfig:
    """Runs ``check`` where aiohttp is about to open a connection: a failure there releases
    the connection's slot and leaves the request (``BaseConnector.connect``)."""
    import aiohttp

    async def checked(
        _session: aiohttp.ClientSession,
        _context: SimpleNamespace,
        _params: aiohttp.TraceConnectionCreateStartParams,
    ) -> None:
        await check()

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(checked)
    return trace


class AiohttpClient(HttpClient):
    """The ``aiohttp`` client of the seam (``providers._http_client``): one session."""

    __slots__ = ("_session", "_timeouts", "_urls")

    def __init__(
        self,
        pool: HttpPool,
        *,
        egress: EgressPolicy,
        unix_socket: str | None = None,
        before_connect: ConnectionCheck | None = None,
    ) -> None:
        self._session = open_session(
            max_connections=pool.max_connections,
            max_per_host=pool.max_per_host,
            keepalive_seconds=pool.idle_timeout_s,
            unix_socket=unix_socket,
            egress=egress,
            before_connect=before_connect,
        )
        self._timeouts: dict[int, aiohttp.ClientTimeout] = {}
        self._urls: dict[str, URL] = {}

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
        import aiohttp

        try:
            async with self._session.post(
                self._urls.get(url) or self._url(url),
                data=body,
                headers=headers,
                timeout=self._timeout(timeout),
                allow_redirects=False,
                # Per request, since one session may carry every target: a plain target
                # passes aiohttp's default; a target with ``tls`` its current context,
                # which is also what keys its pooled connections.
                ssl=True if tls is None else tls.current(),
                server_hostname=None if tls is None else tls.server_name,
            ) as response:
                length = response.content_length
                if length is not None and length <= limit:
                    payload = await response.read()  # the usual answer: one await, no loop
                else:
                    payload = await read_limited(response, limit, target)
                return Reply(response.status, response.headers, payload)
        except TimeoutError:
            raise  # aiohttp's timeouts are ClientErrors too: the deadline comes first
        except aiohttp.ClientConnectorError as error:
            # Refused, unreachable, DNS or TLS handshake: no byte of the request went out.
            raise connect_error(error, target.describe()) from error
        except aiohttp.ClientError as error:
            raise in_flight_error(
                error, target.describe(), None if tls is None else tls.tls
            ) from error

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
        import aiohttp

        try:
            async with self._session.get(
                self._urls.get(url) or self._url(url),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
                ssl=True if tls is None else tls.current(),
                server_hostname=None if tls is None else tls.server_name,
            ) as response:
                body = await response.content.read(limit)
                return Reply(response.status, response.headers, body)
        except TimeoutError:
            raise
        except aiohttp.ClientConnectorError as error:
            raise connect_error(error, target.describe()) from error
        except aiohttp.ClientError as error:
            raise in_flight_error(
                error, target.describe(), None if tls is None else tls.tls
            ) from error

    async def aclose(self) -> None:
        await self._session.close()

    def _url(self, url: str) -> URL:
        """Parsed once per URL: yarl's parse is a measurable part of a call."""
        from yarl import URL

        if len(self._urls) >= 4096:
            self._urls.clear()
        parsed = self._urls[url] = URL(url, encoded=True)
        return parsed

    def _timeout(self, remaining: float) -> aiohttp.ClientTimeout:
        """A client timeout ending at most 1 ms before ``remaining`` seconds, never after.

        Cached by whole milliseconds: building an aiohttp ``ClientTimeout`` (a frozen attrs
        class) on every call was a measurable part of the dispatcher's added latency
        (bench_http), while calls with the same budget arrive with the same few
        millisecond counts. Bounded, so scattered budgets cannot grow it without end.
        """
        milliseconds = int(remaining * 1000)
        timeout = self._timeouts.get(milliseconds)
        if timeout is None:
            import aiohttp

            if milliseconds < 1:  # under a millisecond left: exactly that, uncached
                return aiohttp.ClientTimeout(total=remaining)
            if len(self._timeouts) >= 4096:
                self._timeouts.clear()
            timeout = aiohttp.ClientTimeout(total=milliseconds / 1000)
            self._timeouts[milliseconds] = timeout
        return timeout

    def __repr__(self) -> str:
        connector = self._session.connector
        limit = None if connector is None else connector.limit
        return f"<AiohttpClient limit={limit} closed={self._session.closed}>"


class HttpClients:
    """The clients of one provider: a shared one per kind, and one per target with a ``pool``.

    Opened lazily, when a target first needs one (so pyreqwest is imported only by a
    dispatcher that uses it); every one is closed in ``aclose``.
    """

    __slots__ = (
        "_before_connect",
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
        before_connect: ConnectionCheck | None = None,
    ) -> None:
        # aiohttp is the one client that dials a Unix socket, and that lets a check run
        # before each new connection.
        forced = unix_socket is not None or before_connect is not None
        self._default: ClientKind = "aiohttp" if forced else default
        self._shared_pool = shared_pool
        self._egress = egress
        self._unix_socket = unix_socket
        self._before_connect = before_connect
        self._shared: dict[tuple[ClientKind, bool], HttpClient] = {}
        self._own: list[HttpClient] = []

    def for_target(
        self, kind: ClientKind | None, pool: HttpPool | None, *, http2: bool = False
    ) -> HttpClient:
        """The client of a target that asks for ``kind`` (None: the default) and ``pool``,
        speaking HTTP/2 only when ``http2`` (reqwest alone can: the manifest checks it)."""
        forced = self._unix_socket is not None or self._before_connect is not None
        chosen = self._default if kind is None or forced else kind
        if http2 and chosen != "reqwest":
            raise ProviderError(
                "http2 needs client: reqwest, and this provider's calls go through aiohttp"
                + (" (it dials a Unix socket)" if self._unix_socket is not None else "")
            )
        if pool is not None:
            client = self._open(chosen, pool, http2)
            self._own.append(client)
            return client
        shared = self._shared.get((chosen, http2))
        if shared is None:
            shared = self._shared[chosen, http2] = self._open(chosen, self._shared_pool, http2)
        return shared

    async def aclose(self) -> None:
        clients = [*self._shared.values(), *self._own]
        self._shared.clear()
        self._own.clear()
        for client in clients:
            await client.aclose()

    def _open(self, kind: ClientKind, pool: HttpPool, http2: bool) -> HttpClient:
        if kind == "reqwest":
            try:
                from providers._reqwest import ReqwestClient
            except ImportError as error:  # a host chose it by hand (the manifest checks it)
                raise ProviderError(f"{REQWEST_MISSING} ({error})") from None
            return ReqwestClient(pool, egress=self._egress, http2=http2)
        return AiohttpClient(
            pool,
            egress=self._egress,
            unix_socket=self._unix_socket,
            before_connect=self._before_connect,
        )

    def __repr__(self) -> str:
        shared = [f"{kind}+h2" if http2 else kind for kind, http2 in self._shared]
        return f"<HttpClients default={self._default} shared={shared} own={len(self._own)}>"


async def read_limited(response: aiohttp.ClientResponse, limit: int, target: TargetConfig) -> bytes:
    """The whole body, refusing more than ``limit`` bytes; an incomplete body raises."""
    length = response.content_length
    if length is not None and length <= limit:
        return await response.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise ProviderError(
                f"{target.describe()} answered more than max_response_bytes={limit}"
            )
        chunks.append(chunk)
    return b"".join(chunks)


#: OpenSSL's names of the alerts a server sends when it refuses our client certificate
#: (TLS 1.3 sends them after our side thinks the handshake is done, so they surface when
#: the request is written or its answer read).
_CLIENT_CERTIFICATE_ALERTS = (
    "CERTIFICATE_REQUIRED",
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
)


def _ssl_error_of(error: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind an aiohttp error, if one is: its cause or its context."""
    seen: BaseException | None = error
    for _ in range(4):  # aiohttp wraps once or twice; never loop on a cycle
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        nested = getattr(seen, "os_error", None)
        if isinstance(nested, ssl.SSLError):
            return nested
        seen = seen.__cause__ or seen.__context__
    return None


def _client_certificate_refusal(error: BaseException, where: str) -> TargetUnavailable | None:
    tls_error = _ssl_error_of(error)
    reason = getattr(tls_error, "reason", None) or ""
    if tls_error is None or not any(alert in reason for alert in _CLIENT_CERTIFICATE_ALERTS):
        return None
    return TargetUnavailable(
        f"TLS: {where} refused our client certificate ({reason.lower()}): check tls.cert_file"
        " and tls.key_file, and that the server trusts the CA that signed them",
        # The server refused the handshake: the request never reached the plugin.
        details={"stage": "connect", "tls": "client_certificate_refused"},
    )


def connect_error(error: aiohttp.ClientConnectorError, where: str) -> TargetUnavailable:
    """A connection that could not be opened (refused, unreachable, DNS, TLS handshake)
    as ``TargetUnavailable``: no byte of the request went out (``stage: connect``)."""
    import aiohttp

    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        failure = error.certificate_error
        reason = getattr(failure, "verify_message", None) or str(failure)
        return TargetUnavailable(
            f"TLS: {where} presented a certificate that does not verify ({reason}):"
            " check tls.ca_file (the CA that signs the server's certificate) and"
            " tls.server_name",
            details={"stage": "connect", "tls": "server_certificate"},
        )
    refusal = _client_certificate_refusal(error, where)
    if refusal is not None:
        return refusal
    if isinstance(error, aiohttp.ClientConnectorSSLError):
        return TargetUnavailable(
            f"TLS handshake with {where} failed: {error.os_error}",
            details={"stage": "connect", "tls": "handshake"},
        )
    return TargetUnavailable(f"cannot connect to {where}: {error.os_error}", details=CONNECT_STAGE)


#: What aiohttp's ``ClientOSError`` says when the request's body could not be written.
_UNSENT_BODY = "Can not write request body"


def in_flight_error(
    error: aiohttp.ClientError, where: str, tls: ClientTls | None = None
) -> TargetUnavailable:
    """A failure once the connection was open: it may have reached the plugin.

    With ``tls`` (the target's): in TLS 1.3 the server judges our client certificate after
    our side has finished its handshake, and asyncio servers then close the connection
    without sending the alert, so a refused certificate shows up only as a connection
    closed before any answer. The message says so, without claiming it is certain.
    """
    import aiohttp

    refusal = _client_certificate_refusal(error, where)
    if refusal is not None:
        return refusal
    if isinstance(error, aiohttp.ClientOSError) and _UNSENT_BODY in str(error):
        # aiohttp says this only when writing the body itself failed (``write_bytes``),
        # before its end went out: a plugin reads a body of the length the request
        # announced before it runs anything, so this one never ran.
        reason = os.strerror(error.errno) if error.errno else "the connection closed"
        return TargetUnavailable(
            f"{where}: the request could not be sent whole ({reason}): not run",
            details=CONNECT_STAGE,
        )
    hung_up = isinstance(error, aiohttp.ServerDisconnectedError) or (
        isinstance(error, aiohttp.ClientOSError) and error.errno in (errno.ECONNRESET, errno.EPIPE)
    )
    if tls is not None and hung_up:
        presented = (
            "we presented none (tls.cert_file is not set)"
            if tls.cert_file is None
            else f"we presented {tls.cert_file}"
        )
        return TargetUnavailable(
            f"TLS: {where} closed the connection without answering (hung up or reset); a server that requires"
            f" client certificates does this when it refuses ours ({presented}): check"
            " tls.cert_file and tls.key_file, and that the server trusts the CA that signed"
            " them",
            details={"tls": "closed_without_answer"},
        )
    return TargetUnavailable(f"{where} failed mid-call: {type(error).__name__}: {error}")


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
    """A ``Retry-After`` header (seconds or an HTTP date) as seconds from now."""
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(header).timestamp() - time.time())
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
