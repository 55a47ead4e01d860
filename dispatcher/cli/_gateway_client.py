"""Calls of one method through a running gateway, as a caller in another language makes
them: ``POST /v1/plugins/{plugin}/methods/{method}`` (docs/gateway.md), each answer turned
back into the result or the ``DispatchError`` it carries.

What the gateway does not answer with an envelope is the gateway's (or a proxy's) fault:
``ProviderError``. A connection that fails is ``TargetUnavailable``; an answer that does
not come within the client's own bound is ``DeadlineExceeded``.
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlsplit

import aiohttp
import orjson

from linchkit_plugin.errors import (
    DeadlineExceeded,
    ProviderError,
    TargetUnavailable,
    error_from_wire,
)
from providers.base import CONNECT_STAGE

__all__ = ["AnswerTooLarge", "GatewayCaller", "capped_body", "check_gateway_url"]

#: Largest answer read: a gateway (or what stands in front of it) sending more is not
#: answering a call.
MAX_ANSWER_BYTES = 64 * 1024 * 1024

#: How long a call may take without ``--timeout``: a day and a minute. The gateway ends
#: every call at its method's ``timeout_ms`` (a day at most) and answers
#: ``deadline_exceeded`` itself, so only a gateway that hangs with the connection open
#: meets this bound (the TypeScript client's ``CALL_SAFETY_NET_MS``).
DEFAULT_CLIENT_SECONDS = 86_400.0 + 60.0

#: How long opening a connection to the gateway may take.
CONNECT_SECONDS = 10.0

#: What the client waits beyond ``--timeout`` for the gateway's own deadline answer.
DEADLINE_MARGIN_SECONDS = 5.0


def check_gateway_url(url: str) -> str:
    """``url`` without a trailing slash; ``ValueError`` saying why it is not a gateway's."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected http://HOST:PORT or https://…, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"a gateway URL has no query or fragment: {url!r}")
    return url.rstrip("/")


class GatewayCaller:
    """One method's calls through the gateway at ``url``, ``concurrency`` connections."""

    def __init__(
        self,
        url: str,
        plugin: str,
        method: str,
        *,
        concurrency: int,
        version: str | None = None,
        timeout: float | None = None,
        api_key: str | None = None,
        token: str | None = None,
    ) -> None:
        self._url = f"{url}/v1/plugins/{quote(plugin, safe='')}/methods/{quote(method, safe='')}"
        self._where = url
        self._headers = _headers(version, timeout, api_key, token)
        seconds = DEFAULT_CLIENT_SECONDS if timeout is None else timeout + DEADLINE_MARGIN_SECONDS
        self._timeout = aiohttp.ClientTimeout(total=seconds, sock_connect=CONNECT_SECONDS)
        self._concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        connector = aiohttp.TCPConnector(limit=self._concurrency)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers=self._headers
        )
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, params: Any) -> Any:
        """The method's result, or the ``DispatchError`` the gateway answered."""
        assert self._session is not None, "entered before calling"
        try:
            async with self._session.post(self._url, data=orjson.dumps(params)) as answer:
                body = await _read_capped(answer)
                status = answer.status
        except aiohttp.ConnectionTimeoutError:
            raise TargetUnavailable(
                f"gateway {self._where}: no connection within {CONNECT_SECONDS:g} s;"
                " the call was not sent",
                details=dict(CONNECT_STAGE),
            ) from None
        except TimeoutError:
            raise DeadlineExceeded(
                f"gateway {self._where} did not answer within {self._timeout.total:g} s"
            ) from None
        except aiohttp.ClientError as error:
            raise TargetUnavailable(f"gateway {self._where}: {error}") from None
        return _result_of(status, body, self._where)


def _headers(
    version: str | None, timeout: float | None, api_key: str | None, token: str | None
) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if version is not None:
        headers["X-Plugin-Version"] = version
    if timeout is not None:
        headers["X-Timeout-Ms"] = str(max(math.ceil(timeout * 1000), 1))
    if api_key is not None:
        headers["X-API-Key"] = api_key
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


class AnswerTooLarge(Exception):
    """An answer declared or sent more than a reader takes."""


async def capped_body(answer: aiohttp.ClientResponse, limit: int) -> bytes:
    """``answer``'s body, ``AnswerTooLarge`` past ``limit`` bytes: refused on its declared
    length before anything is read, or as soon as what came passes it (no length, a lie)."""
    if (answer.content_length or 0) > limit:
        raise AnswerTooLarge
    body = bytearray()
    async for chunk in answer.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge
    return bytes(body)


async def _read_capped(answer: aiohttp.ClientResponse) -> bytes:
    try:
        return await capped_body(answer, MAX_ANSWER_BYTES)
    except AnswerTooLarge:
        raise ProviderError(f"the gateway's answer is over {MAX_ANSWER_BYTES:,} bytes") from None


def _result_of(status: int, body: bytes, where: str) -> Any:
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError:
        envelope = None
    if isinstance(envelope, dict):
        if status == 200 and envelope.get("ok") is True and "result" in envelope:
            return envelope["result"]
        if status != 200 and "error" in envelope:
            raise error_from_wire(envelope["error"])
    raise ProviderError(f"gateway {where} answered {status} without a call's envelope")
