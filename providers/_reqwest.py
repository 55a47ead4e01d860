"""The ``reqwest`` client of the seam (``providers._http_client``): Rust's reqwest through pyreqwest.

The only module that imports pyreqwest, and only when a target's calls first go through it
(``providers._http_common`` imports this module then): its names are imported once, here at
the top, not in each call (a function-level ``from … import`` cost 0.25 µs per call).
Why it is on the hot path: on the fixed-reply server it made more calls/s at concurrency 64
than aiohttp for less CPU per call, every thread of the process counted
(``bench/bench_http_clients.py``; figures in ``docs/architecture.md``).

One pyreqwest ``Client`` per target URL (and per TLS generation): its own pool sized by the
target's ``pool:``, its own client certificate, and its own resolved addresses. It is
closed once no target calls its URL any more (``forget``: the provider says so when the
last plugin attached to the last such target is detached), or with the provider.

* **Egress.** reqwest resolves names itself and cannot be handed a resolver from Python, so
  a name is resolved here when the target's client is built, every address is checked
  against the egress policy, and the client is pinned to the admitted ones
  (``ClientBuilder.resolve``): reqwest never dials anything the policy refuses. The pin
  holds for the client's life (a name that moves is followed when the target reloads).
* **TLS.** ``ca_file`` is trusted besides the built-in roots (rustls); ``cert_file`` and
  ``key_file`` are presented as the client identity; TLS 1.2 at least. A reload of the
  files (``ClientTlsContext``) gives a new context, and a new client is built for it; the
  old one is closed with the URL's others (``forget``) or the provider. ``server_name``
  is sent and verified by putting it in the request URL and pinning it to the real
  host's addresses.
* **Authority.** A client made with ``authority`` (a Knative service on HTTP/2, which its
  ingress routes by ``:authority``; HTTP/2 has no ``Host`` header to set) puts that name
  in the request URL the same way: the requests name the service and go to the ingress.
* **Requests in flight.** ``pool.max_connections`` is kept by an ``InFlightLimit`` per
  client (``providers._in_flight``), not by pyreqwest's own bound, whose wait for a slot
  under the request's timeout cost more than the whole check here. A cancelled call's
  slot stays taken until its request's timeout has passed (below).
* **No redirects, no decompression, no cookies, no proxies from the environment.**
* **Errors.** pyreqwest names the failing stage only in its causes' text; hyper-util's
  ``client error (Connect)`` is the connect stage (nothing sent). Everything is translated
  here (``_translate``) into the errors of the seam.
* **Threads.** pyreqwest runs its I/O on one tokio runtime per process, started on first
  use and shared by every client; ``aclose`` closes this provider's clients and their idle
  connections, the runtime's one thread stays for the process (it holds nothing of ours).
* **Exit.** That thread takes the GIL to finish some of its work (a call's teardown just
  after its answer, a client's after it is dropped). If it asks while the interpreter is
  finalizing, CPython ends the thread inside Rust and the process aborts
  (``Fatal Python error: PyGILState_Release``): a short-lived process that made a call
  through this client and returned at once died so in 2-10% of runs (a bare pyreqwest
  script in one of two). ``_settle_at_exit`` (an ``atexit`` hook, registered when the
  first client is built) collects the clients left unreferenced and sends two requests
  that end inside the runtime without I/O, with the GIL released: whatever the thread had
  queued before them has run when they return, before finalization begins
  (``tests/test_http_clients.py`` runs such a process 60 times). A client some module
  still holds at exit is torn down after the hook, during finalization: ``aclose`` it.
* **Cancelled calls.** pyreqwest 0.15 detaches, rather than aborts, the task of a call
  whose awaiting side is cancelled: its connection stays open until the plugin answers or
  the request's timeout fires (``providers._http_client.DEFAULT_CLIENT`` says why that
  keeps reqwest from being the default), so its slot is given back only then.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import gc
import ipaddress
import math
import socket
from collections.abc import Collection, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pyreqwest.client import ClientBuilder, SyncClientBuilder
from pyreqwest.exceptions import (
    ClientClosedError,
    NetworkError,
    PyreqwestError,
    RequestTimeoutError,
)
from pyreqwest.http import Url

from linchkit_plugin.errors import ProviderError, TargetUnavailable
from providers._http_client import HttpClient, HttpPool, Reply, closed_client
from providers._in_flight import InFlightLimit
from providers.base import CONNECT_STAGE
from providers.egress import EgressPolicy
from providers.target import TargetConfig
from providers.tls import ClientTlsContext

if TYPE_CHECKING:
    from pyreqwest.client import Client
    from pyreqwest.response import Response

__all__ = ["ReqwestClient"]

#: rustls' names of the alerts a server sends when it refuses our client certificate.
_CLIENT_CERTIFICATE_ALERTS = (
    "CertificateRequired",
    "UnknownCA",
    "BadCertificate",
    "CertificateUnknown",
    "CertificateExpired",
    "CertificateRevoked",
    "UnsupportedCertificate",
    "AccessDenied",
)
#: A URL reqwest refuses inside the runtime, before any I/O (its scheme is not http or
#: https): a request to it is a round trip through the runtime's queue and nothing more.
_NO_IO_URL = "settle://runtime.invalid/"
#: Round trips at exit: one lets the thread run what it had queued; the second, what that
#: work queued in turn (a connection's shutdown after its client's pool was dropped).
_SETTLE_ROUND_TRIPS = 2

#: hyper's words for a connection that closed or was reset before the answer was whole.
_HUNG_UP = (
    "connection closed",
    "connection reset",
    "reset by peer",
    "close_notify",
    "broken pipe",
    "IncompleteMessage",
)


class _Entry:
    """A built client and the URL to send to it (``server_name`` may replace the host),
    parsed once: pyreqwest parses a URL given as text on every request (0.4 µs of the
    ~1.6 µs a request costs to build, bench/bench_http.py), and its requests in flight."""

    __slots__ = ("client", "slots", "url")

    def __init__(self, client: Client, url: Url, slots: InFlightLimit) -> None:
        self.client = client
        self.url = url
        #: The bound on requests in flight through ``client`` (``pool.max_connections``).
        self.slots = slots


class _Building:
    """A client of a URL being built: ``forgotten`` once a ``forget`` of the URL came."""

    __slots__ = ("forgotten",)

    def __init__(self) -> None:
        self.forgotten = False


#: How long after its timeout a cancelled call's request still holds its slot: reqwest's
#: timer ticks in milliseconds, and its thread may run late on a busy machine.
_DETACHED_MARGIN = 0.05

#: ``timedelta`` per whole millisecond of a request's timeout (``_timeout``).
_TIMEOUTS: dict[int, timedelta] = {}
#: Timeouts kept at most: every call of a method with one deadline asks for a handful.
_MOST_TIMEOUTS = 4096


def _timeout(seconds: float) -> timedelta:
    """A request's timeout, rounded up to the whole millisecond: never shorter than the
    time the call has left, and tokio's timer, which ticks in milliseconds, rounds up to
    its tick anyway. Building a ``timedelta`` from seconds costs 0.2 µs; finding the one
    built for that millisecond, 0.07 µs."""
    milliseconds = math.ceil(seconds * 1000)
    timeout = _TIMEOUTS.get(milliseconds)
    if timeout is None:
        if len(_TIMEOUTS) >= _MOST_TIMEOUTS:
            _TIMEOUTS.clear()
        timeout = _TIMEOUTS[milliseconds] = timedelta(0, 0, 0, milliseconds)
    return timeout


class ReqwestClient(HttpClient):
    """pyreqwest clients, one per target URL and TLS generation, closed by ``forget`` (a
    URL no target calls any more) or ``aclose``."""

    __slots__ = ("_authority", "_closed", "_egress", "_entries", "_http2", "_pool", "_resolving")

    def __init__(
        self,
        pool: HttpPool,
        *,
        egress: EgressPolicy,
        http2: bool = False,
        authority: str | None = None,
    ) -> None:
        self._pool = pool
        self._egress = egress
        #: HTTP/2 only, by prior knowledge (``http2:`` of the target): h2c on http://.
        self._http2 = http2
        #: The host every request names (its :authority, its Host), sent to the URL's
        #: host's addresses: a Knative service behind its ingress.
        self._authority = authority
        #: Every client built and not closed, by URL, or by URL and TLS context.
        self._entries: dict[str | tuple[str, object], _Entry] = {}
        #: The clients being built, by URL, while their host resolves: a ``forget`` of
        #: the URL meanwhile marks them, so none is stored after it (``_entry``).
        self._resolving: dict[str, list[_Building]] = {}
        self._closed = False

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
        entry = self._entries.get(url if tls is None else (url, tls.current()))
        if entry is None:
            entry = await self._entry(url, tls, target)
        slots = entry.slots
        if not slots.take():
            timeout = await slots.wait(timeout)
        try:
            request = (
                entry.client.post(entry.url)
                .headers(headers)
                .body_bytes(body)
                .timeout(_timeout(timeout))
                .build_streamed()
            )
        except ValueError:
            slots.give_back()
            raise _unsendable(target) from None
        try:
            try:
                async with request as response:
                    length = response.get_header("content-length")
                    if length is not None and length.isdigit() and int(length) <= limit:
                        payload = (await response.bytes()).to_bytes()  # the usual answer
                    else:
                        payload = await _read_streamed(response, limit, target)
                    reply = Reply(response.status, response.headers, payload)
            except RequestTimeoutError:
                raise TimeoutError from None
            except PyreqwestError as error:
                raise _translate(error, target.describe(), tls) from error
        except asyncio.CancelledError:
            slots.give_back_after(timeout + _DETACHED_MARGIN)  # the request runs on
            raise
        except BaseException:
            slots.give_back()
            raise
        slots.give_back()
        return reply

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
        entry = self._entries.get(url if tls is None else (url, tls.current()))
        if entry is None:
            entry = await self._entry(url, tls, target)
        # The slot is taken and given back as in ``post`` (written out there, where every
        # call passes: a helper shared by both would be one coroutine more per call).
        slots = entry.slots
        timeout = await slots.wait(timeout)
        try:
            request = (
                entry.client.get(entry.url)
                .headers(headers)
                .timeout(_timeout(timeout))
                .build_streamed()
            )
        except ValueError:
            slots.give_back()
            raise _unsendable(target) from None
        try:
            try:
                async with request as response:
                    reader = response.body_reader
                    chunk = await reader.read(limit)
                    body = b"" if chunk is None else chunk.to_bytes()
                    reply = Reply(response.status, response.headers, body)
            except RequestTimeoutError:
                raise TimeoutError from None
            except PyreqwestError as error:
                raise _translate(error, target.describe(), tls) from error
        except asyncio.CancelledError:
            slots.give_back_after(timeout + _DETACHED_MARGIN)
            raise
        except BaseException:
            slots.give_back()
            raise
        slots.give_back()
        return reply

    async def aclose(self) -> None:
        self._closed = True
        entries = list(self._entries.values())
        self._entries.clear()
        for entry in entries:
            await entry.client.close()

    async def forget(self, urls: Collection[str]) -> None:
        """Close the clients of ``urls`` (each TLS generation's), their connections with
        them. A call under way on one ends as the seam's ``TargetUnavailable``; the next
        call to such a URL builds its client again."""
        gone = [key for key in self._entries if _url_of(key) in urls]
        entries = [self._entries.pop(key) for key in gone]  # before any await: a call
        for url in urls:  # that comes meanwhile builds a client of its own
            for building in self._resolving.get(url, ()):
                building.forgotten = True
        for entry in entries:
            await entry.client.close()

    def urls_held(self) -> frozenset[str]:
        return frozenset(_url_of(key) for key in self._entries)

    async def _entry(self, url: str, tls: ClientTlsContext | None, target: TargetConfig) -> _Entry:
        """Build the client of ``url`` (resolving and checking its host first)."""
        from yarl import URL

        if self._closed:
            raise closed_client(target.describe(), sent=False)
        key = url if tls is None else (url, tls.current())
        parsed = URL(url, encoded=True)
        host, port = parsed.host or "", parsed.port or 0
        builder = self._builder(tls)
        request_url = url
        # The name the request carries, where it is not the URL's host: reqwest takes the
        # request's authority (and the name TLS verifies) from the URL it sends to, so
        # that name goes in the URL, pinned to the addresses of the real host.
        named = self._authority or (None if tls is None else tls.server_name)
        if named is not None or not _is_address(host):
            addresses = await self._resolved(url, host, port, target)
            name = named or host
            for address in addresses:
                builder = builder.resolve(name, address, port)
            if self._authority is not None:
                # The authority as HTTP/1.1's Host was sent: the name alone. Without a port
                # in the URL, the connection takes the pinned address's (the ingress's).
                request_url = str(parsed.with_host(self._authority).with_port(None))
            elif named is not None:
                request_url = str(parsed.with_host(named))
        try:
            parsed_url = Url(request_url)
        except ValueError as error:  # the manifest's checks let no such URL through
            raise ProviderError(
                f"{target.describe()}: reqwest cannot send to it: {error}"
            ) from None
        built = self._entries.get(key)
        if built is not None:  # another call built it while this one resolved
            return built
        if self._closed:  # closed while this one resolved: a client now would stay open
            raise closed_client(target.describe(), sent=False)
        client = builder.build()
        _settle_before_exit()
        entry = self._entries[key] = _Entry(
            client, parsed_url, InFlightLimit(self._pool.max_connections)
        )
        return entry

    def _builder(self, tls: ClientTlsContext | None) -> Any:
        pool = self._pool
        builder = (
            ClientBuilder()
            .follow_redirects(False)
            .referer(False)
            .gzip(False)
            .brotli(False)
            .zstd(False)
            .deflate(False)
            .no_proxy()
            .pool_idle_timeout(timedelta(seconds=pool.idle_timeout_s))
            .pool_max_idle_per_host(pool.max_per_host or pool.max_connections)
        )
        if self._http2:
            # Without an upgrade or ALPN: the first bytes on a new connection are HTTP/2's
            # preface, so a server that speaks only HTTP/1.1 fails the call at once (as a
            # connection it closed or answered with garbage), not after a timeout.
            builder = builder.http2_prior_knowledge()
        if tls is None:
            return builder
        builder = builder.min_tls_version("TLSv1.2")
        files = tls.tls
        try:
            if files.ca_file is not None:
                builder = builder.add_root_certificate_pem(files.ca_file.read_bytes())
            if files.cert_file is not None and files.key_file is not None:
                identity = files.cert_file.read_bytes() + b"\n" + files.key_file.read_bytes()
                builder = builder.identity_pem(identity)
        except (OSError, ValueError) as error:
            raise ProviderError(f"cannot load the target's TLS files: {error}") from None
        return builder

    async def _resolved(self, url: str, host: str, port: int, target: TargetConfig) -> list[str]:
        """``_admitted``, as a build of ``url``'s client: one that the URL's ``forget``
        overtook ends as a call on a client closed under it, before it was sent. Else it
        stored a client of a URL no target calls any more, open until the next ``forget``
        of that URL or the close."""
        building = _Building()
        waiting = self._resolving.setdefault(url, [])
        waiting.append(building)
        try:
            addresses = await self._admitted(host, port, target)
        finally:
            waiting.remove(building)
            if not waiting:
                del self._resolving[url]
        if building.forgotten:
            raise closed_client(target.describe(), sent=False)
        return addresses

    async def _admitted(self, host: str, port: int, target: TargetConfig) -> list[str]:
        """The addresses of ``host`` the egress policy admits (``EgressRefused`` if none)."""
        if _is_address(host):
            self._egress.admitted(host, [host])
            return [host]
        refusal = self._egress.name_refusal(host)
        if refusal is not None:
            self._egress.admitted(host, [])  # raises EgressRefused naming the reason
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as error:
            raise TargetUnavailable(
                f"cannot connect to {target.describe()}: cannot resolve {host}: {error}",
                details=CONNECT_STAGE,
            ) from None
        found = list(dict.fromkeys(str(info[4][0]) for info in infos))
        return self._egress.admitted(host, found)

    def __repr__(self) -> str:
        return (
            f"<ReqwestClient clients={len(self._entries)}"
            f" max_connections={self._pool.max_connections}"
            f"{' http2' if self._http2 else ''} closed={self._closed}>"
        )


@functools.cache
def _settle_before_exit() -> None:
    """Register ``_settle_at_exit`` once, when this process first builds a client."""
    atexit.register(_settle_at_exit)


def _settle_at_exit() -> None:
    """Let pyreqwest's thread finish what needs the GIL while the interpreter still runs.

    Runs at exit (``atexit``), before finalization: clients nobody holds are collected
    now (their teardown is queued on the thread), then each request to ``_NO_IO_URL``
    blocks with the GIL released until the runtime has answered it.
    """
    gc.collect()
    try:
        settler = SyncClientBuilder().build()
        for _ in range(_SETTLE_ROUND_TRIPS):
            with contextlib.suppress(PyreqwestError):  # its refusal is the awaited answer
                settler.get(_NO_IO_URL).build().send()
        settler.close()
    except (PyreqwestError, RuntimeError):  # e.g. a forked child, whose runtime is gone
        return


async def _read_streamed(response: Response, limit: int, target: TargetConfig) -> bytes:
    """The whole body of an answer that did not say its length (or said one over
    ``limit``), refusing more than ``limit`` bytes as it arrives."""
    reader = response.body_reader
    chunks: list[bytes] = []
    size = 0
    while (chunk := await reader.read_chunk()) is not None:
        size += len(chunk)
        if size > limit:
            raise ProviderError(
                f"{target.describe()} answered more than max_response_bytes={limit}"
            )
        chunks.append(chunk.to_bytes())
    return b"".join(chunks)


def _url_of(key: str | tuple[str, object]) -> str:
    """The URL of a key of ``ReqwestClient._entries``."""
    return key if isinstance(key, str) else key[0]


def _unsendable(target: TargetConfig) -> ProviderError:
    """reqwest refused to build the request: a header it cannot send (its message quotes
    the value, which may be a secret; the manifest's check refuses such headers first)."""
    return ProviderError(
        f"{target.describe()}: reqwest cannot send the request: a header name or value is"
        " not valid in HTTP"
    )


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _causes(error: BaseException) -> list[str]:
    details = getattr(error, "details", None)
    causes = details.get("causes") if isinstance(details, dict) else None
    if not isinstance(causes, list):
        return [str(error)]
    return [str(cause.get("message", "")) for cause in causes if isinstance(cause, dict)]


def _translate(error: BaseException, where: str, tls: ClientTlsContext | None) -> TargetUnavailable:
    """A pyreqwest failure as the seam's ``TargetUnavailable`` (connect stage or mid-call)."""
    if isinstance(error, ClientClosedError):  # ``forget`` or ``aclose`` closed it under the call
        return closed_client(where, sent=True)
    causes = _causes(error)
    text = "; ".join(causes)
    last = causes[-1] if causes else str(error)
    refused = next((alert for alert in _CLIENT_CERTIFICATE_ALERTS if alert in text), None)
    if refused is not None:
        return TargetUnavailable(
            f"TLS: {where} refused our client certificate ({refused}): check tls.cert_file"
            " and tls.key_file, and that the server trusts the CA that signed them",
            details={"stage": "connect", "tls": "client_certificate_refused"},
        )
    if "client error (Connect)" in causes:
        if "invalid peer certificate" in text or "certificate" in last.lower():
            return TargetUnavailable(
                f"TLS: {where} presented a certificate that does not verify ({last}):"
                " check tls.ca_file (the CA that signs the server's certificate) and"
                " tls.server_name",
                details={"stage": "connect", "tls": "server_certificate"},
            )
        if tls is not None and ("tls" in text.lower() or "handshake" in text.lower()):
            return TargetUnavailable(
                f"TLS handshake with {where} failed: {last}",
                details={"stage": "connect", "tls": "handshake"},
            )
        return TargetUnavailable(f"cannot connect to {where}: {last}", details=CONNECT_STAGE)
    hung_up = isinstance(error, NetworkError) and any(word in text for word in _HUNG_UP)
    if tls is not None and hung_up:
        cert_file = tls.tls.cert_file
        presented = (
            "we presented none (tls.cert_file is not set)"
            if cert_file is None
            else f"we presented {cert_file}"
        )
        return TargetUnavailable(
            f"TLS: {where} closed the connection without answering (hung up or reset); a"
            " server that requires client certificates does this when it refuses ours"
            f" ({presented}): check tls.cert_file and tls.key_file, and that the server"
            " trusts the CA that signed them",
            details={"tls": "closed_without_answer"},
        )
    if "connection error detected" in text:  # h2's words for a peer that broke HTTP/2
        return TargetUnavailable(
            f"{where} broke HTTP/2 ({last}): with http2: true the server must speak HTTP/2"
            " without negotiating (h2c on http://); one that speaks only HTTP/1.1 fails so",
            details={"http2": "protocol_error"},
        )
    return TargetUnavailable(f"{where} failed mid-call: {type(error).__name__}: {last}")
