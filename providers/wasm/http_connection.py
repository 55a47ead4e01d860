"""The connection of a wasm module's HTTP request, once it passed every check
(``providers.wasm.http_host``): to the first admitted address that takes it (that address:
nothing resolves the name again), over ``https`` verified against the URL's host, every
wait bounded by the call's end (``BoundedSocket``), and the answer's body read up to its
bound. A wait past the call's end raises ``TimedOut``; any other failure is a
``ProviderError`` naming the host and the reason.
"""

from __future__ import annotations

import http.client
import io
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from providers.capabilities import LimitExceeded
from providers.wasm.http_request import Target

__all__ = [
    "BoundedSocket",
    "TimedOut",
    "connect",
    "headers_of",
    "read_body",
    "reason",
    "tls",
]

#: A response's body is read in pieces of this size, so the bound is checked as it grows.
_READ_BYTES = 64 * 1024


class TimedOut(Exception):
    """The call's end came while its HTTP request was under way."""


def connect(
    target: Target,
    connections: Sequence[tuple[socket.AddressFamily, Any]],
    remaining: Callable[[], float],
) -> socket.socket:
    """A socket connected to the first of ``connections`` (the admitted addresses, in
    order) that takes the connection."""
    failures: list[str] = []
    for family, sockaddr in connections:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(remaining())
            sock.connect(sockaddr)
        except TimeoutError:
            sock.close()
            raise TimedOut from None
        except OSError as error:
            sock.close()
            failures.append(f"{sockaddr[0]}: {error.strerror or error}")
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise target.failed(f"cannot connect ({'; '.join(failures)})")


def tls(
    context: Callable[[], ssl.SSLContext],
    target: Target,
    sock: socket.socket,
    remaining: Callable[[], float],
) -> socket.socket:
    """``sock`` wrapped in TLS, its certificate verified against the URL's host;
    ``context`` is called only then (``HttpGrant.tls``: it loads the trust store once)."""
    try:
        sock.settimeout(remaining())
        return context().wrap_socket(sock, server_hostname=target.host)
    except TimeoutError:
        raise TimedOut from None
    except ssl.SSLCertVerificationError as error:
        raise target.failed(
            f"its certificate is not trusted for {target.host}: {error.verify_message}"
        ) from None
    except OSError as error:  # ssl.SSLError among them
        raise target.failed(f"TLS: {reason(error)}") from None


def read_body(response: http.client.HTTPResponse, target: Target, limit: int) -> bytes:
    if response.length is not None and response.length > limit:
        raise _too_large(target, limit, f"its Content-Length is {response.length}")
    pieces: list[bytes] = []
    read = 0
    while piece := response.read(min(_READ_BYTES, limit + 1 - read)):
        pieces.append(piece)
        read += len(piece)
        if read > limit:
            raise _too_large(target, limit, "it went on past that")
    return b"".join(pieces)


def _too_large(target: Target, limit: int, how: str) -> LimitExceeded:
    error = LimitExceeded(
        f"HTTP request to {target.host}: the answer's body is larger than {limit} bytes"
        f" ({how}), a quarter of the plugin's memory_mb",
        limit="http_response_bytes",
        value=limit,
    )
    error.details["host"] = target.host
    return error


def headers_of(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Names in lower case as Extism's own (the ``http`` crate's); a repeated header's
    values joined with ``, ``, as HTTP allows, where Extism kept the last one only."""
    joined: dict[str, str] = {}
    for name, value in headers:
        lower = name.lower()
        joined[lower] = f"{joined[lower]}, {value}" if lower in joined else value
    return joined


def reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


class BoundedSocket:
    """The socket ``http.client`` writes to and reads from: every wait ends when the call
    does (a socket's own timeout bounds each wait, not their sum: a server that trickles a
    byte at a time would hold the call past its end)."""

    __slots__ = ("_remaining", "_sock")

    def __init__(self, sock: socket.socket, remaining: Callable[[], float]) -> None:
        self._sock = sock
        self._remaining = remaining

    def _bound(self) -> None:
        try:
            self._sock.settimeout(self._remaining())
        except TimedOut:
            raise TimeoutError("the call's end came") from None

    def sendall(self, data: bytes | memoryview) -> None:
        self._bound()
        self._sock.sendall(data)

    def recv_into(self, buffer: Any) -> int:
        self._bound()
        return self._sock.recv_into(buffer)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_Reader(self))

    def close(self) -> None:
        """Nothing: ``http.client`` closes its connection once the answer's head is read
        (``Connection: close``), and the body is read after; ``HttpState`` closes the socket."""


class _Reader(io.RawIOBase):
    def __init__(self, sock: BoundedSocket) -> None:
        self._socket = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._socket.recv_into(buffer)
