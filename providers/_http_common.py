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
import time
from email.utils import parsedate_to_datetime
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
from providers.egress import EgressPolicy
from providers.target import TargetConfig, masked_url

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

__all__ = [
    "basic_authorization",
    "envelope_error",
    "open_session",
    "read_limited",
    "redirect_detail",
    "retry_after_seconds",
    "status_error",
]


def open_session(
    *,
    max_connections: int,
    keepalive_seconds: float,
    egress: EgressPolicy,
    unix_socket: str | None = None,
) -> aiohttp.ClientSession:
    """One keep-alive pool for every target of a provider; no automatic headers, no decoding.

    Names resolve through ``egress``: forbidden addresses are never dialled, and a name
    left with none raises ``EgressRefused`` out of the request. Address literals skip
    resolution in aiohttp: callers check those themselves (``EgressPolicy.check``).
    ``unix_socket``: send every request over this socket (a socket the provider was given
    in code, not one from the manifest); the URL then only names the host.
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
            limit_per_host=0,
            keepalive_timeout=keepalive_seconds,
            resolver=EgressResolver(egress),
        )
    return aiohttp.ClientSession(
        connector=connector, skip_auto_headers=("User-Agent",), auto_decompress=False
    )


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
