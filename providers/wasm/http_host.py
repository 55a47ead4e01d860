"""The HTTP requests a wasm module makes, made by the dispatcher and not by libextism.

A module asks through Extism's ``http_request`` host function (``extism:host/env``; what
every PDK's ``NewHTTPRequest(...).Send()`` calls). libextism's own client checks the first
URL's host only, follows a redirect to any host and connects wherever a name resolves;
``providers.wasm.runtime`` shadows it, and ``http_status_code`` and ``http_headers`` with
it, by functions that hand each request to ``HttpState.request`` here. Before a byte is
sent, a request must pass, in this order:

1. its form: Extism's request JSON ``{url, method, headers}`` (at most
   ``MAX_REQUEST_BYTES``), and its body an Extism memory block; an ``http`` or ``https``
   URL of at most ``MAX_URL_LENGTH`` printable ASCII characters, without credentials; a
   method that is a token; at most ``MAX_HEADERS`` headers of ``MAX_HEADER_BYTES`` in all,
   whose names are tokens and whose values are printable ASCII, no CR, LF or control
   character (a header split in two is a request smuggled in one); none of the headers the
   dispatcher sets itself (``Host``, ``Content-Length``, ``Connection``…) unless it says
   what the dispatcher does;
2. the plugin's grant, ``capabilities.network``: the URL's host matches one of its names
   as Extism's ``allowed_hosts`` would (``fnmatch``'s globs, as the ``glob`` crate's:
   ``*.example.com``), or it is an address written in the URL that lies in one of its
   networks (``10.0.0.0/8``);
3. the manifest's egress policy (``providers.egress``): a name it refuses (metadata names,
   names ``egress.allow`` can never admit) is not even looked up, and every address the
   name resolves to, resolved here and once, is checked: link-local and metadata
   addresses are refused unless allowed, and only ``egress.allow`` when it is set;
4. its body's size: at most ``HttpGrant.max_request_body_bytes`` (a quarter of
   ``memory_mb``, as an answer's: ``providers.wasm.sandbox``), checked before a byte of it
   is copied out of the module. Refusals come first: a request both refused and too large
   is refused, and logged as such.

Then the request goes to the first admitted address that takes the connection (that
address: nothing resolves the name again), carries the URL's own ``Host``, and over
``https`` the certificate is verified against the URL's host (the standard library's
default context: the system's trust store, or ``SSL_CERT_FILE``). One request per
connection. A redirect is an answer like any other: the module gets its status, headers
and body, and nothing follows it. The body is read up to ``HttpGrant.max_response_bytes``.
Every wait ends when the call does: the name's lookup (on the ``Resolver``'s threads, which
go on alone while the system resolver takes its time; at most ``MAX_LOOKUPS`` at once,
``providers.wasm.resolver``), the connection, each write and each read.

A request that fails ends the call, as libextism's own failures do (they trap):

    the form or the grant refused            NetworkRefused (a ProviderError), nothing sent
    the egress policy refused the addresses  EgressRefused, nothing sent
    the request's body larger than its bound LimitExceeded(limit="http_request_body_bytes"),
                                             nothing sent
    the answer's body larger than its bound  LimitExceeded(limit="http_response_bytes")
    no address, no connection, an untrusted  ProviderError naming the host and the reason
    certificate, an answer that is not HTTP,
    ``MAX_LOOKUPS`` lookups under way
    the call's end reached                   the call's deadline (or its cpu_s) passed

Once a call is stopped (``HttpState.stopped``: a request of it failed, or its deadline,
its cpu_s or a close came) the module runs on to its next instruction where the stop takes
effect, and may ask for more meanwhile: nothing more goes out, and nothing more is judged
(``providers.wasm.runtime``: its request cannot even be read then). A refusal made before
the stop is the call's outcome even when the deadline came before its thread was back, and
is logged even when the caller was answered first (``providers.wasm.provider``).

Here: the grant, each call's state and the order of the checks, and the grant's and the
egress policy's judgement (steps 2 and 3). The request's form is ``http_request``'s, its
connection ``http_connection``'s. No extism import: ``providers.wasm.runtime`` moves the
bytes in and out of the module.
"""

from __future__ import annotations

import fnmatch
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

from linchkit_plugin.errors import DispatchError, ProviderError
from providers.capabilities import LimitExceeded
from providers.egress import EgressPolicy, EgressRefused
from providers.wasm.http_connection import (
    BoundedSocket,
    TimedOut,
    connect,
    headers_of,
    read_body,
    reason,
    tls,
)
from providers.wasm.http_request import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_REQUEST_BYTES,
    MAX_URL_LENGTH,
    IPNetwork,
    NetworkRefused,
    Target,
    checked_headers,
    parsed,
)
from providers.wasm.resolver import AddressInfo, Resolver, ResolverBusy

__all__ = [
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_URL_LENGTH",
    "HttpGrant",
    "HttpState",
    "NetworkRefused",
    "RequestBody",
    "TimedOut",
    "is_refusal",
]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def is_refusal(error: BaseException) -> bool:
    """Whether ``error`` is a refusal of the form, the grant or the egress policy: a
    security incident, logged as one (``providers.wasm.provider``)."""
    return isinstance(error, NetworkRefused | EgressRefused)


class RequestBody(Protocol):
    """A request's body where the module left it (``providers.wasm.runtime``): its length
    known at once, its bytes copied out only for a request that passed every check."""

    def __len__(self) -> int: ...

    def copied(self) -> AbstractContextManager[memoryview]:
        """Its bytes, copied out of the module once, readable within the ``with``; raises
        ``NetworkRefused`` when not all of them can be read."""
        ...


class HttpGrant:
    """Where one plugin's module may send HTTP requests, how large a body may be each way,
    and the resolver its names are looked up with."""

    __slots__ = (
        "_tls",
        "_tls_lock",
        "egress",
        "hosts",
        "max_request_body_bytes",
        "max_response_bytes",
        "networks",
        "resolver",
    )

    def __init__(
        self,
        hosts: Iterable[str],
        networks: Iterable[IPNetwork],
        egress: EgressPolicy,
        *,
        max_response_bytes: int,
        max_request_body_bytes: int,
        resolver: Resolver,
    ) -> None:
        #: Name patterns of ``capabilities.network`` (Extism's ``allowed_hosts``).
        self.hosts = tuple(host.lower() for host in hosts)
        self.networks = tuple(networks)
        self.egress = egress
        self.max_response_bytes = max_response_bytes
        self.max_request_body_bytes = max_request_body_bytes
        #: The provider's, shared by its plugins: its bound on lookups is for them all.
        self.resolver = resolver
        self._tls: ssl.SSLContext | None = None
        self._tls_lock = threading.Lock()

    def tls(self) -> ssl.SSLContext:
        """The default context, made once per plugin: it loads the trust store (tens of ms)."""
        with self._tls_lock:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            return self._tls

    def describe(self) -> str:
        granted = [*self.hosts, *(str(network) for network in self.networks)]
        return ", ".join(granted) or "none"

    def __repr__(self) -> str:
        return (
            f"<HttpGrant {self.describe()} max_request_body_bytes={self.max_request_body_bytes}"
            f" max_response_bytes={self.max_response_bytes}>"
        )


class HttpState:
    """The HTTP side of one wasm call: its end, and its last answer's status and headers.

    ``Instance.call`` makes one per call and keeps it for the thread the call runs on,
    where the host functions find it, so concurrent calls never share one.
    """

    __slots__ = ("_stop", "ends", "failure", "grant", "headers", "status", "stopped", "timed_out")

    def __init__(self, grant: HttpGrant | None, ends: float, stop: Callable[[], object]) -> None:
        self.grant = grant
        #: ``time.monotonic()`` when the pool stops the call (its deadline or cpu_s).
        self.ends = ends
        self._stop = stop
        self.status = 0
        self.headers: dict[str, str] | None = None
        #: Why a request of this call failed; the call fails with it.
        self.failure: DispatchError | None = None
        self.timed_out = False
        #: Set once the call was told to stop, by ``fail`` or by whoever cancels the call
        #: (``Instance.cancel``: its deadline, its cpu_s, a close); any thread may set it.
        self.stopped = False

    def fail(self, error: BaseException) -> None:
        """End the call with ``error``: recorded for the provider, and the module stopped at
        its next instruction (it must not go on as if it had an answer)."""
        self.stopped = True
        if isinstance(error, TimedOut):
            self.timed_out = True
        elif isinstance(error, DispatchError):
            self.failure = self.failure or error
        else:
            self.failure = self.failure or ProviderError(
                f"the HTTP host function failed: {type(error).__name__}: {error}"
            )
        self._stop()

    def request(self, request: bytes, body: RequestBody | None) -> bytes:
        """Send the module's request; the answer's body. Raises ``NetworkRefused``,
        ``EgressRefused``, ``LimitExceeded``, ``ProviderError`` or ``TimedOut``."""
        if self.stopped:
            # Not yet at an instruction where the stop takes effect (a host call is none):
            # nothing more goes out.
            return b""
        self.status, self.headers = 0, None
        url, method, asked = parsed(request)
        target = Target.of(url)
        length = None if body is None else len(body)
        headers = checked_headers(target, asked, length, method)
        grant = self.grant
        if grant is None:
            raise target.refused("the plugin is granted no network (capabilities.network)")
        connections = _admitted(grant, target, self._remaining)
        if length is not None and length > grant.max_request_body_bytes:
            raise _body_too_large(target, length, grant.max_request_body_bytes)
        with nullcontext(None) if body is None else body.copied() as data:
            sock = connect(target, connections, self._remaining)
            try:
                if target.scheme == "https":
                    sock = tls(grant.tls, target, sock, self._remaining)
                return self._exchange(grant, target, sock, method, headers, data)
            finally:
                sock.close()

    def __repr__(self) -> str:
        ended = "timed out" if self.timed_out else repr(self.failure) if self.failure else "ok"
        return f"<HttpState status={self.status} {ended}>"

    def _remaining(self) -> float:
        remaining = self.ends - time.monotonic()
        if remaining <= 0:
            raise TimedOut
        return remaining

    def _exchange(
        self,
        grant: HttpGrant,
        target: Target,
        sock: socket.socket,
        method: str,
        headers: list[tuple[str, str]],
        body: memoryview | None,
    ) -> bytes:
        connection = http.client.HTTPConnection(target.host, target.port)
        connection.sock = BoundedSocket(sock, self._remaining)
        try:
            connection.putrequest(method, target.path, skip_host=True, skip_accept_encoding=True)
            connection.putheader("Host", target.authority)
            for name, value in headers:
                connection.putheader(name, value)
            if body is not None or method in _BODY_METHODS:
                connection.putheader("Content-Length", str(0 if body is None else len(body)))
            connection.putheader("Connection", "close")
            connection.endheaders(body)
            response = connection.getresponse()
            self.status = response.status
            self.headers = headers_of(response.getheaders())
            return read_body(response, target, grant.max_response_bytes)
        except TimeoutError:
            raise TimedOut from None
        except http.client.IncompleteRead:
            raise target.failed("the answer ended before its body") from None
        except (http.client.HTTPException, OSError) as error:
            raise target.failed(reason(error)) from None


def _admitted(
    grant: HttpGrant, target: Target, remaining: Callable[[], float]
) -> list[tuple[socket.AddressFamily, Any]]:
    """Where to connect: the ``(family, socket address)`` pairs the URL's host resolves to
    that the egress policy admits, in the resolver's order."""
    host = target.host
    by_name = any(fnmatch.fnmatchcase(host, pattern) for pattern in grant.hosts)
    # A network grants the addresses written in URLs, not names: a name nobody granted is
    # not even looked up (a lookup is a message to whoever serves that name's zone).
    in_network = target.address is not None and any(
        target.address in network for network in grant.networks
    )
    if not (by_name or in_network):
        raise target.refused(f"{host} is not granted (capabilities.network: {grant.describe()})")
    if target.address is None:
        # Before it is resolved: metadata names, names egress.allow can never admit.
        refusal = grant.egress.name_refusal(host)
        if refusal is not None:
            raise EgressRefused(
                f"HTTP request to {host} refused: egress policy refuses {host}: {refusal}",
                details={"host": host},
            )
    infos: Sequence[AddressInfo]
    try:
        if target.address is not None:  # written in the URL: nothing to wait for
            infos = socket.getaddrinfo(
                host, target.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        else:
            infos = grant.resolver.resolve(host, target.port, timeout=remaining())
    except TimeoutError:
        raise TimedOut from None
    except ResolverBusy as busy:
        raise target.failed(f"cannot resolve {host}: {busy}") from None
    except (OSError, UnicodeError) as error:
        raise target.failed(f"cannot resolve {host}: {error}") from None
    found: dict[str, tuple[socket.AddressFamily, Any]] = {}
    for family, _, _, _, sockaddr in infos:
        found.setdefault(str(sockaddr[0]), (family, sockaddr))
    try:
        admitted = grant.egress.admitted(host, list(found))
    except EgressRefused as error:
        raise EgressRefused(
            f"HTTP request to {host} refused: {error.message}", details={"host": host}
        ) from None
    return [found[each] for each in admitted]


def _body_too_large(target: Target, length: int, limit: int) -> LimitExceeded:
    error = LimitExceeded(
        f"HTTP request to {target.host} refused: the request's body is {length} bytes,"
        f" larger than {limit}, a quarter of the plugin's memory_mb (send less per request,"
        " or raise memory_mb)",
        limit="http_request_body_bytes",
        value=limit,
    )
    error.details["host"] = target.host
    return error
