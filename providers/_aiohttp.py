"""The ``aiohttp`` client of the seam (``providers._http_client``), and aiohttp's errors
in the seam's words.

The provider's default client, and the one session every other user of aiohttp in the
dispatcher opens (``open_session``: job callbacks, the WebSocket provider's handshake).
aiohttp is imported only when a session is opened or an error translated, so importing
a provider does not load it.

Every request on these sessions passes ``allow_redirects=False``: a redirect would re-send
the envelope and the target's secret headers to wherever a target (or whoever answers in
its place) points, including a metadata address. The session's resolver enforces the
egress policy on every address a name resolves to (``providers._egress_resolver``).

Errors: a connection that could not be opened (refused, unreachable, DNS, TLS handshake)
is ``TargetUnavailable`` with ``stage: connect`` (``connect_error``); a failure once it was
open may have reached the plugin (``in_flight_error``), except a body that could not be
written whole. A refused client certificate is named as such either way.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import ssl
from collections.abc import Callable, Collection, Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from linchkit_plugin.errors import ProviderError, TargetUnavailable
from providers._http_client import ConnectionCheck, HttpClient, HttpPool, Reply, closed_client
from providers.base import CONNECT_STAGE
from providers.egress import EgressPolicy
from providers.target import TargetConfig
from providers.tls import ClientTls, ClientTlsContext

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

__all__ = ["AiohttpClient", "connect_error", "in_flight_error", "open_session", "read_limited"]


def open_session(
    *,
    max_connections: int,
    keepalive_seconds: float,
    egress: EgressPolicy,
    unix_socket: str | None = None,
    max_per_host: int = 0,
    connection_check: ConnectionCheck | None = None,
) -> aiohttp.ClientSession:
    """One keep-alive pool for every target of a provider; no automatic headers, no decoding.

    Names resolve through ``egress``: forbidden addresses are never dialled, and a name
    left with none raises ``EgressRefused`` out of the request. Address literals skip
    resolution in aiohttp: callers check those themselves (``EgressPolicy.check``).
    ``unix_socket``: send every request over this socket (a socket the provider was given
    in code, not one from the manifest); the URL then only names the host.
    ``connection_check``: asked before each new connection and once it is open, before
    the request is written (``ConnectionCheck``).
    """
    import aiohttp

    from providers._egress_resolver import EgressResolver

    connector: aiohttp.BaseConnector
    if unix_socket is not None:
        connector = aiohttp.UnixConnector(
            unix_socket, limit=max_connections, keepalive_timeout=keepalive_seconds
        )
    else:
        connector_of = (
            aiohttp.TCPConnector
            if connection_check is None
            else functools.partial(_checked_connector(), connection_check)
        )
        connector = connector_of(
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
        trace_configs=None
        if connection_check is None
        else [_checked_connections(connection_check)],
    )


def _checked_connections(check: ConnectionCheck) -> aiohttp.TraceConfig:
    """Runs ``check.before_connect`` where aiohttp is about to open a connection: a failure
    there releases the connection's slot and leaves the request (``BaseConnector.connect``)."""
    import aiohttp

    async def checked(
        _session: aiohttp.ClientSession,
        _context: SimpleNamespace,
        _params: aiohttp.TraceConnectionCreateStartParams,
    ) -> None:
        await check.before_connect()

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(checked)
    return trace


@functools.cache
def _checked_connector() -> Callable[..., aiohttp.TCPConnector]:
    """A ``TCPConnector`` that asks its ``_connection_check`` about each connection it
    opens, once it is open and before it is handed to a request.

    aiohttp has no public hook there: its ``on_connection_create_end`` trace is told
    nothing of the connection. ``_create_connection`` is where ``BaseConnector.connect``
    gets a new connection from (aiohttp 3.9-3.14; tests/test_docker_port_owner.py fails if
    the check stops running); a failure there releases the connection's slot, as one of
    the connect itself does.
    """
    import aiohttp

    class CheckedConnector(aiohttp.TCPConnector):
        def __init__(self, check: ConnectionCheck, **options: Any) -> None:
            super().__init__(**options)
            self._connection_check = check

        async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
            protocol = await super()._create_connection(req, traces, timeout)
            try:
                transport = protocol.transport
                local = None if transport is None else transport.get_extra_info("sockname")
                await self._connection_check.connected(local)
            except BaseException:
                protocol.close()
                raise
            return protocol

    return CheckedConnector


class AiohttpClient(HttpClient):
    """The ``aiohttp`` client of the seam (``providers._http_client``): one session."""

    __slots__ = ("_session", "_timeouts", "_urls")

    def __init__(
        self,
        pool: HttpPool,
        *,
        egress: EgressPolicy,
        unix_socket: str | None = None,
        connection_check: ConnectionCheck | None = None,
    ) -> None:
        self._session = open_session(
            max_connections=pool.max_connections,
            max_per_host=pool.max_per_host,
            keepalive_seconds=pool.idle_timeout_s,
            unix_socket=unix_socket,
            egress=egress,
            connection_check=connection_check,
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
        except (aiohttp.ClientError, RuntimeError, asyncio.CancelledError) as error:
            translated = self._translated(error, target, tls)
            if translated is None:
                raise
            raise translated from error

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
        except (aiohttp.ClientError, RuntimeError, asyncio.CancelledError) as error:
            translated = self._translated(error, target, tls)
            if translated is None:
                raise
            raise translated from error

    async def aclose(self) -> None:
        self._urls.clear()
        await self._session.close()

    async def forget(self, urls: Collection[str]) -> None:
        for url in urls:
            self._urls.pop(url, None)

    def urls_held(self) -> frozenset[str]:
        return frozenset(self._urls)

    def _translated(
        self, error: BaseException, target: TargetConfig, tls: ClientTlsContext | None
    ) -> TargetUnavailable | None:
        """A request's failure as the seam's error, or None for one that is not the
        target's to answer for (to go up as it is): a ``RuntimeError`` that is not
        aiohttp's refusal of a closed session (a bug to see), a cancel that is the
        caller's, not the session's close (a closing connector cancels the requests
        waiting for one of its connections, a full ``pool:``, which sent nothing)."""
        import aiohttp

        where = target.describe()
        if isinstance(error, aiohttp.ClientConnectorError):
            # Refused, unreachable, DNS or TLS handshake: no byte of the request went out.
            return connect_error(error, where)
        closed = self._session.closed
        if isinstance(error, aiohttp.ClientError):
            if closed:  # it closed the connection itself: no peer hung up
                return closed_client(where, sent=True)
            return in_flight_error(error, where, None if tls is None else tls.tls)
        if isinstance(error, asyncio.CancelledError):
            task = asyncio.current_task()
            closed = closed and task is not None and not task.cancelling()
        return closed_client(where, sent=False) if closed else None

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
