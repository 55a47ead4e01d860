"""The control plane: every request but Invoke passed to moto's server, and what Invoke reads there.

moto is the source of truth for functions, versions, aliases and concurrency settings.
``ControlPlane.proxy`` is the catch-all route: it forwards a request unchanged (minus
hop-by-hop headers) and answers moto's answer unchanged; on the way it hands the zips of
successful ``CreateFunction``/``UpdateFunctionCode`` calls to the ``CodeStore``.

For Invoke, ``function`` and ``reserved_concurrency`` read a function version's
configuration and its reserved concurrency from moto, signed with the caller's own
``Authorization`` (moto keys its state by account and region). Their answers are cached
until the next write of any kind passes through ``proxy``; that is the only invalidation,
so a write that reaches moto by another route is not seen until then. CloudWatch Logs
requests change no function and leave the cache as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson

from dispatcher.testing.local_lambda.code import CodeStore
from dispatcher.testing.local_lambda.function import Function

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web

__all__ = ["ControlPlane"]

_HOP_BY_HOP = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)


class ControlPlane:
    """moto's server behind the local Lambda's endpoint, with a cache for Invoke's reads."""

    def __init__(self, url: str, session: aiohttp.ClientSession, code: CodeStore) -> None:
        self.url = url
        self._session = session
        self._code = code
        # Function configurations read from moto, until the next write passes through.
        self._configurations: dict[tuple[str, str], Function | int | None] = {}

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        body = await request.read()
        # CloudWatch Logs requests (all POSTs, ``dispatcher logs --follow`` polls) change
        # no function.
        logs = request.headers.get("X-Amz-Target", "").startswith("Logs_")
        if request.method not in ("GET", "HEAD") and not logs:
            self._configurations.clear()
        status, headers, answer = await self._to_moto(
            request.method, request.path_qs, request.headers, body
        )
        if 200 <= status < 300 and request.method in ("POST", "PUT"):
            self._code.remember(request.path, body, answer)
        return web.Response(status=status, body=answer, headers=headers)

    async def function(self, request: web.Request, name: str) -> Function | web.Response:
        """The version ``request`` invokes (its ``Qualifier``), or moto's error answer."""
        from aiohttp import web

        path = f"/2015-03-31/functions/{name}"
        qualifier = request.query.get("Qualifier")
        if qualifier:
            path += f"?Qualifier={qualifier}"
        cached = self._configurations.get((path, _region(request)))
        if isinstance(cached, Function):
            return cached
        status, headers, answer = await self._to_moto("GET", path, _auth(request))
        if status != 200:
            return web.Response(status=status, body=answer, headers=headers)
        function = Function.from_configuration(orjson.loads(answer)["Configuration"])
        self._configurations[(path, _region(request))] = function
        return function

    async def reserved_concurrency(self, request: web.Request, name: str) -> int | None:
        """The function's reserved concurrency, ``None`` if it has none."""
        path = f"/2019-09-30/functions/{name}/concurrency"
        cache_key = (path, _region(request))
        if cache_key in self._configurations:
            cached = self._configurations[cache_key]
            return cached if isinstance(cached, int) else None
        status, _, answer = await self._to_moto("GET", path, _auth(request))
        value = (
            orjson.loads(answer).get("ReservedConcurrentExecutions")
            if status == 200 and answer
            else None
        )
        reserved = self._configurations[cache_key] = value if isinstance(value, int) else None
        return reserved

    async def _to_moto(
        self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        forwarded = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._session.request(
            method, self.url + path_qs, data=body, headers=forwarded
        ) as response:
            answer = await response.read()
            kept = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}
            return response.status, kept, answer


def _auth(request: web.Request) -> dict[str, str]:
    """The caller's signature headers, so moto answers for the caller's account and region."""
    return {
        k: v
        for k, v in request.headers.items()
        if k.lower().startswith(("authorization", "x-amz-date"))
    }


def _region(request: web.Request) -> str:
    """The region a request is signed for (``Credential=KEY/DATE/REGION/SERVICE/...``)."""
    authorization = request.headers.get("Authorization", "")
    _, _, credential = authorization.partition("Credential=")
    parts = credential.split("/")
    return parts[2] if len(parts) > 2 else ""
