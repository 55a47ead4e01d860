"""Serve a plugin as an HTTP function: a plain ASGI app, runnable by any ASGI server.

Routes (``docs/protocol.md``):

* ``POST /invoke``  a request envelope, or ``{"batch": [...]}``; always answers an envelope.
  200 for every call the plugin handled, including the plugin's own errors; 400 for a
  malformed envelope; 413 for a body over ``max_body_bytes``.
* ``GET /health``   200 ``{"status": "serving"}`` or 503 ``{"status": "not_serving"}``.
* ``GET /describe`` the plugin's methods and the protocol version.

The ASGI lifespan runs the plugin's ``init``/``start`` at startup and ``stop``/``destroy``
at shutdown. Written against raw ASGI, without a framework, because this is a hot path
with three routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from linchkit_plugin.errors import DispatchError, InvalidParams, ProviderError
from linchkit_plugin.host import PluginHost
from linchkit_plugin.wire import (
    PROTOCOL_VERSION,
    RequestEnvelope,
    error_response,
    ok_response,
    parse_request,
)

__all__ = ["PluginApp"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON_HEADERS = [(b"content-type", b"application/json")]


class PluginApp:
    """ASGI application hosting one plugin."""

    def __init__(
        self,
        host: PluginHost,
        *,
        config: dict[str, Any] | None = None,
        max_body_bytes: int = 8 * 1024 * 1024,
        plugin_id: str = "",
        version: str = "",
    ) -> None:
        self.host = host
        self.config = config or {}
        self.max_body_bytes = max_body_bytes
        self.plugin_id = plugin_id or str(getattr(host.plugin, "id", "") or "")
        self.version = version or str(getattr(host.plugin, "version", "") or "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.host.open(self.config)
                except Exception as error:
                    await send({"type": "lifespan.startup.failed", "message": repr(error)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.host.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if path == "/invoke" and method == "POST":
            status, body = await self._invoke(receive)
        elif path == "/health" and method == "GET":
            healthy, detail = await self.host.health()
            status = 200 if healthy else 503
            body = {"status": "serving" if healthy else "not_serving", "detail": detail}
        elif path == "/describe" and method == "GET":
            status, body = 200, self._describe()
        elif path in {"/invoke", "/health", "/describe"}:
            status, body = 405, error_response(ProviderError(f"{method} is not allowed on {path}"))
        else:
            status, body = 404, error_response(ProviderError(f"no route {path}"))
        payload = orjson.dumps(body)
        await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": payload})

    async def _invoke(self, receive: Receive) -> tuple[int, dict[str, Any]]:
        raw = await self._read_body(receive)
        if raw is None:
            too_big = InvalidParams(f"request body is larger than {self.max_body_bytes} bytes")
            return 413, error_response(too_big)
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            return 400, error_response(ProviderError(f"request body is not JSON: {error}"))
        if isinstance(payload, dict) and "batch" in payload:
            return await self._invoke_batch(payload["batch"])
        try:
            request = parse_request(payload)
        except DispatchError as error:
            return 400, error_response(error)
        return 200, await self._answer(request)

    async def _invoke_batch(self, items: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(items, list):
            return 400, error_response(ProviderError("'batch' must be a list of request envelopes"))
        answers = await asyncio.gather(*(self._answer_raw(item) for item in items))
        return 200, {"results": answers}

    async def _answer_raw(self, item: Any) -> dict[str, Any]:
        try:
            request = parse_request(item)
        except DispatchError as error:
            return error_response(error)
        return await self._answer(request)

    async def _answer(self, request: RequestEnvelope) -> dict[str, Any]:
        deadline_ms = request.deadline_ms
        timeout = deadline_ms / 1000 if deadline_ms is not None else None
        try:
            result = await self.host.call_with_deadline(
                request.method, request.params, request.context, timeout
            )
        except DispatchError as error:
            return error_response(error)
        return ok_response(result)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _describe(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "id": self.plugin_id,
            "version": self.version,
            "methods": sorted(self.host.methods),
        }
