"""Serve a plugin as an HTTP function: a plain ASGI app, runnable by any ASGI server.

Routes (``docs/protocol.md``):

* ``POST /invoke``  a request envelope, or ``{"batch": [...]}``; always answers an envelope.
  200 for every call the plugin handled, including the plugin's own errors; 400 for a
  malformed envelope or params nested too deep; 401 without the bearer token (or with
  more than one ``Authorization`` header, whatever they say, as over gRPC); 408 when
  the body does not arrive within ``body_timeout``; 413 for a body over
  ``max_body_bytes`` or a batch over ``max_batch_items``; 415 for a body that is not
  ``application/json``; 503 for a call the server cut off as it stopped.
  A body may come in ``Content-Encoding: gzip`` or ``zstd`` (``linchkit_plugin.encodings``):
  decoded with its output capped at ``max_body_bytes`` (413 past it, so a bomb costs at most
  the limit), 400 when it is not valid in its coding or cut short, 415 for another coding.
  An answer of ``compress_min_bytes`` or more goes in the first coding the caller's
  ``Accept-Encoding`` admits. Every answer says ``Accept-Encoding``: what this server decodes.
* ``GET /health``   200 ``{"status": "serving"}`` or 503 ``{"status": "not_serving"}``.
  Open without the token, because orchestrators probe it without one; the plugin's
  health detail is only told to a caller that has the token.
* ``GET /describe`` the plugin's methods and the protocol version (token required).

Every refusal is decided from the headers before the body is read, where it can be, and
an answer given before the body was read whole closes the connection, so the unread
rest is never taken for the next request.

A client that disconnects while its call runs (the dispatcher closes the connection of a
call its caller cancelled) cancels the method, which sees ``CancelledError``, and nothing
is answered: ``_unless_disconnected``. A call the server cancels (a stopping server cuts
off what outlived its grace: uvicorn's ``timeout_graceful_shutdown``) is answered ``503``
``target_unavailable`` with ``details["stage"] == "in_flight"``: the plugin is going
away, and the call may have run. A ``CancelledError`` the method raised of its own
accord is no cancellation (``_method_failures``): that call's ``plugin_error``, a 200.

The ASGI lifespan runs the plugin's ``init``/``start`` at startup and ``stop``/``destroy``
at shutdown, ``stop_caps.hooks`` at most together. Written against raw ASGI, without a framework, because this is a hot path
with three routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

import orjson

from linchkit_plugin._method_failures import cancelled_from_outside, unanswerable
from linchkit_plugin._starting import StartFailed, open_plugin
from linchkit_plugin.auth import BearerToken
from linchkit_plugin.encodings import (
    ACCEPT_ENCODING,
    SUPPORTED,
    UndecodableBody,
    accepted,
    decode,
    encode,
)
from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    InvalidParams,
    ProviderError,
    TargetUnavailable,
    Unauthorized,
)
from linchkit_plugin.host import PluginHost
from linchkit_plugin.limits import ServerLimits
from linchkit_plugin.stopping import StopCaps
from linchkit_plugin.wire import (
    MAX_PARAMS_DEPTH,
    PROTOCOL_VERSION,
    RequestEnvelope,
    error_response,
    nested_deeper_than,
    ok_response,
    parse_request,
    result_fragment,
)

__all__ = ["PluginApp"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON_HEADERS = [
    (b"content-type", b"application/json"),
    (b"accept-encoding", ACCEPT_ENCODING.encode()),
]
_CLOSING_JSON_HEADERS = [*_JSON_HEADERS, (b"connection", b"close")]
_UNAUTHORIZED_HEADERS = [*_CLOSING_JSON_HEADERS, (b"www-authenticate", b"Bearer")]

_T = TypeVar("_T")

#: The paths the HTTP binding serves: another method on one is 405, another path 404.
_ROUTES = frozenset({"/invoke", "/health", "/describe"})
#: The HTTP status of each reason a compressed body cannot be decoded.
_UNDECODABLE_STATUS = {"unknown": 415, "too_large": 413, "corrupt": 400}
#: Bodies above this are compressed or decoded in a worker thread, not on the event loop.
_OFF_LOOP_BYTES = 256 * 1024


class _Refused(Exception):
    """An answer decided before the call runs; the body may be unread, so close after it."""

    def __init__(
        self, status: int, error: DispatchError, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(error.message)
        self.status = status
        self.error = error
        self.headers = headers or _CLOSING_JSON_HEADERS


class _Disconnected(Exception):
    """The client went away before its body arrived: nobody is left to answer."""


class PluginApp:
    """ASGI application hosting one plugin.

    ``token``: the bearer token every call must carry; ``None`` serves anyone (local
    development only). ``limits``: what one request may cost (``ServerLimits``).
    ``stop_caps``: the ``hooks`` of it bound the ``stop`` and ``destroy`` hooks at the
    lifespan's shutdown (its ``grace`` is the server's to give the calls in flight:
    ``dispatcher-plugin serve`` gives it to uvicorn).
    """

    def __init__(
        self,
        host: PluginHost,
        *,
        config: dict[str, Any] | None = None,
        token: BearerToken | None = None,
        limits: ServerLimits | None = None,
        plugin_id: str = "",
        version: str = "",
        stop_caps: StopCaps | None = None,
    ) -> None:
        self.host = host
        self.config = config or {}
        self.token = token
        self.limits = limits or ServerLimits()
        self.stop_caps = stop_caps or StopCaps()
        if plugin_id:  # the id the calls' spans name; else the envelope's ``plugin``
            host.plugin_id = plugin_id
        self.plugin_id = host.plugin_id
        self.version = version or str(getattr(host.plugin, "version", "") or "")

    @property
    def max_body_bytes(self) -> int:
        return self.limits.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._refuse_upgrade(scope, receive, send)

    async def _refuse_upgrade(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a WebSocket handshake, on any path, before accepting it.

        The HTTP binding (docs/protocol.md) is three plain HTTP routes; WebSocket is a
        binding of its own, another server (``serve --websocket``). So a handshake is
        answered as a request no route takes, with the HTTP server's error envelope: 405
        on a route's path, 404 elsewhere. Left unanswered (until 2026-12-07), uvicorn
        answered a plain-text 500 and logged an error for each, which a peer could repeat
        at will. An ASGI server that sends no such answer (no ``websocket.http.response``
        extension) is told to close: uvicorn answers that 403."""
        await receive()  # websocket.connect: the handshake has arrived whole
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        path = scope["path"]
        refusal = ProviderError(
            f"this plugin is served over HTTP, and {path} takes no WebSocket upgrade: a"
            " websocket target needs it served with `dispatcher-plugin serve --websocket`"
        )
        payload = orjson.dumps(error_response(refusal))
        length = (b"content-length", str(len(payload)).encode())
        await send(
            {
                "type": "websocket.http.response.start",
                "status": 405 if path in _ROUTES else 404,
                "headers": [*_CLOSING_JSON_HEADERS, length],
            }
        )
        await send({"type": "websocket.http.response.body", "body": payload})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await open_plugin(self.host, self.config)
                except StartFailed as failed:
                    await send({"type": "lifespan.startup.failed", "message": str(failed)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.host.close_within(self.stop_caps.hooks)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        headers = _JSON_HEADERS
        try:
            if path == "/invoke" and method == "POST":
                self._authorize(scope)
                status, body = await self._invoke(scope, receive)
            elif path == "/health" and method == "GET":
                status, body = await self._health(scope)
            elif path == "/describe" and method == "GET":
                self._authorize(scope)
                status, body = 200, self._describe()
            elif path in _ROUTES:
                status = 405
                body = error_response(ProviderError(f"{method} is not allowed on {path}"))
            else:
                status, body = 404, error_response(ProviderError(f"no route {path}"))
        except _Refused as refused:
            status, body, headers = refused.status, error_response(refused.error), refused.headers
        except _Disconnected:
            return
        except asyncio.CancelledError:
            # The server cancelled the call (not the client, _unless_disconnected): it is
            # stopping, and the call outlived the grace it gives the calls in flight. Left to
            # uvicorn, the answer was a plain-text 500, which the host reads as the plugin
            # failing; this one it maps, and the task goes on to send it.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            status, body, headers = (
                503,
                error_response(_cut_off_by_the_stop()),
                _CLOSING_JSON_HEADERS,
            )
        payload = _encode_answer(body)
        if len(payload) >= self.limits.compress_min_bytes:
            payload, headers = await self._compressed(scope, payload, headers)
        length = (b"content-length", str(len(payload)).encode())
        await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
        await send({"type": "http.response.body", "body": payload})

    async def _compressed(
        self, scope: Scope, payload: bytes, headers: list[tuple[bytes, bytes]]
    ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """``payload`` in the caller's first accepted coding; as it is if it accepts none."""
        codings = accepted((_header(scope, b"accept-encoding") or b"").decode("latin-1"))
        if not codings:
            return payload, headers
        coding = codings[0]
        if len(payload) > _OFF_LOOP_BYTES:
            packed = await asyncio.to_thread(encode, payload, coding)
        else:
            packed = encode(payload, coding)
        encoded = [(b"content-encoding", coding.encode()), (b"vary", b"accept-encoding")]
        return packed, [*headers, *encoded]

    def _authorize(self, scope: Scope) -> None:
        if self.token is None or self.token.admits_headers(_headers(scope, b"authorization")):
            return
        # Never quote what the client sent: it may be a real token for something else.
        refusal = Unauthorized("this plugin requires 'Authorization: Bearer <token>'")
        raise _Refused(401, refusal, _UNAUTHORIZED_HEADERS)

    async def _health(self, scope: Scope) -> tuple[int, dict[str, Any]]:
        healthy, detail = await self.host.health()
        body: dict[str, Any] = {"status": "serving" if healthy else "not_serving"}
        if self.token is None or self.token.admits_headers(_headers(scope, b"authorization")):
            body["detail"] = detail
        return (200 if healthy else 503), body

    async def _invoke(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        self._check_content_type(scope)
        self._check_content_encoding(scope)
        self._check_content_length(scope)
        raw = await self._decoded(scope, await self._read_body(receive))
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            if "depth" in str(error):  # over orjson's own 1,024 levels
                too_deep = InvalidParams(f"params are nested deeper than {MAX_PARAMS_DEPTH} levels")
                return 400, error_response(too_deep)
            return 400, error_response(ProviderError(f"request body is not JSON: {error}"))
        # Nesting deeper than MAX_PARAMS_DEPTH needs more brackets than that: count them
        # (at C speed) before walking anything, so ordinary calls pay nothing.
        deep = raw.count(b"[") + raw.count(b"{") > MAX_PARAMS_DEPTH
        if isinstance(payload, dict) and "batch" in payload:
            return await _unless_disconnected(receive, self._invoke_batch(payload["batch"], deep))
        try:
            request = parse_request(payload)
            if deep:
                _check_depth(request.params)
        except DispatchError as error:
            return 400, error_response(error)
        return 200, await _unless_disconnected(receive, self._answer(request))

    def _check_content_type(self, scope: Scope) -> None:
        content_type = _header(scope, b"content-type") or b""
        media_type = content_type.partition(b";")[0].strip().lower()
        if media_type != b"application/json":
            shown = content_type.decode("latin-1")[:100] or "none"
            unsupported = InvalidParams(
                f"request body must be 'Content-Type: application/json', not {shown!r}"
            )
            raise _Refused(415, unsupported)

    def _check_content_encoding(self, scope: Scope) -> None:
        """A coding this server does not decode is refused before the body is read."""
        coding = _header(scope, b"content-encoding")
        if coding is None:
            return
        name = coding.decode("latin-1").strip().lower()
        if name not in SUPPORTED and name not in ("", "identity"):
            unsupported = InvalidParams(
                f"Content-Encoding {name[:40]!r} is not one this server decodes"
                f" (it takes {ACCEPT_ENCODING})"
            )
            raise _Refused(415, unsupported)

    async def _decoded(self, scope: Scope, raw: bytes) -> bytes:
        """The body as sent before its ``Content-Encoding``, capped at ``max_body_bytes``."""
        coding = _header(scope, b"content-encoding")
        if coding is None:
            return raw
        name = coding.decode("latin-1")
        try:
            if len(raw) > _OFF_LOOP_BYTES // 8:
                return await asyncio.to_thread(decode, raw, name, self.max_body_bytes)
            return decode(raw, name, self.max_body_bytes)
        except UndecodableBody as error:
            status = _UNDECODABLE_STATUS[error.kind]
            if error.kind == "too_large":
                raise _Refused(status, self._too_big("the decompressed request body")) from None
            raise _Refused(status, InvalidParams(error.message)) from None

    def _check_content_length(self, scope: Scope) -> None:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _Refused(413, self._too_big(f"Content-Length {int(declared)}"))

    def _too_big(self, what: str) -> InvalidParams:
        return InvalidParams(
            f"{what} is over this server's {self.max_body_bytes}-byte limit"
            " (--max-body-bytes, LINCHKIT_PLUGIN_MAX_BODY_BYTES)"
        )

    async def _invoke_batch(self, items: Any, deep: bool) -> tuple[int, dict[str, Any]]:
        if not isinstance(items, list):
            return 400, error_response(ProviderError("'batch' must be a list of request envelopes"))
        if len(items) > self.limits.max_batch_items:
            too_many = InvalidParams(
                f"batch has {len(items)} items; this server takes at most"
                f" {self.limits.max_batch_items} (--max-batch-items,"
                " LINCHKIT_PLUGIN_MAX_BATCH_ITEMS): split it"
            )
            return 413, error_response(too_many)
        answers = await asyncio.gather(*(self._answer_raw(item, deep) for item in items))
        return 200, {"results": answers}

    async def _answer_raw(self, item: Any, deep: bool) -> dict[str, Any]:
        try:
            request = parse_request(item)
            if deep:
                _check_depth(request.params)
        except DispatchError as error:
            return error_response(error)
        return await self._answer(request)

    async def _answer(self, request: RequestEnvelope) -> dict[str, Any]:
        deadline_ms = request.deadline_ms
        timeout = deadline_ms / 1000 if deadline_ms is not None else None
        try:
            result = await self.host.call_with_deadline(
                request.method, request.params, request.context, timeout, plugin=request.plugin
            )
        except DispatchError as error:
            return error_response(error)
        except BaseException as error:  # past the host's own mapping: still this call's answer
            if isinstance(error, asyncio.CancelledError) and cancelled_from_outside():
                raise
            return error_response(unanswerable(request.method, error))
        return ok_response(result)

    async def _read_body(self, receive: Receive) -> bytes:
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                return await self._receive_body(receive)
        except TimeoutError:
            late = DeadlineExceeded(
                f"the request body did not arrive within {self.limits.body_timeout:g} s"
                " (--body-timeout, LINCHKIT_PLUGIN_BODY_TIMEOUT)"
            )
            raise _Refused(408, late) from None

    async def _receive_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _Refused(413, self._too_big("the request body"))
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

    def __repr__(self) -> str:
        guarded = "token required" if self.token is not None else "no token"
        return f"<PluginApp {self.host!r} {guarded} {self.limits!r}>"


async def _unless_disconnected(receive: Receive, running: Awaitable[_T]) -> _T:
    """``running``, cancelled when the client disconnects first (then ``_Disconnected``).

    The method runs in this task, as before; one watcher task waits on ``receive()`` for
    ``http.disconnect`` and cancels this task, so the plugin's method sees
    ``CancelledError`` as a cancelled call does on the local and subprocess targets, and
    nothing is written back. Its cost is that task: 5-6 µs a call on uvloop (7-8 µs on
    asyncio's own loop), timed over 100,000 calls of a method that yields once; a call to
    ``dispatcher-plugin serve`` over a kept-alive connection takes 350-420 µs, and 5 x
    2,000 of them before and after differed by less than their run-to-run noise.
    """
    this = asyncio.current_task()
    if this is None:  # not in a task (no ASGI server runs an app so): nothing to cancel
        return await running
    gone = False

    async def watch() -> None:
        nonlocal gone
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a server whose receive() fails after the body: no watching
            return
        gone = True
        this.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await running
    except asyncio.CancelledError:
        # Cancelled by the watcher alone (not also by the server stopping): the client is
        # gone, and nobody is left to answer.
        if gone and this.uncancel() == 0:
            raise _Disconnected from None
        raise
    finally:
        watcher.cancel()


def _cut_off_by_the_stop() -> TargetUnavailable:
    # "in_flight", as the WebSocket provider says of a call its stopping plugin cut off:
    # retryable, but it may have run, so only a retry policy (for a method safe to run
    # twice) sends it again; a fleet fails over only what was never sent ("connect").
    return TargetUnavailable(
        "the plugin is stopping: the call was cut off at the end of the grace its calls in"
        " flight get, and may have run",
        details={"stage": "in_flight"},
    )


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _headers(scope: Scope, name: bytes) -> list[bytes]:
    """Every value of header ``name`` (lower case), in order: where a second one matters."""
    return [bytes(value) for key, value in scope["headers"] if key == name]


def _check_depth(params: Any) -> None:
    if nested_deeper_than(params, MAX_PARAMS_DEPTH):
        raise InvalidParams(f"params are nested deeper than {MAX_PARAMS_DEPTH} levels")


def _encode_answer(body: dict[str, Any]) -> bytes:
    """``body`` as JSON; a result JSON cannot carry (an object it has no form for, a NaN
    or an infinity) becomes that call's error, in a batch that item's, not a 500."""
    try:
        return result_fragment(body)
    except ProviderError:
        pass
    if "results" in body:
        return orjson.dumps({"results": [_encodable(answer) for answer in body["results"]]})
    return orjson.dumps(_encodable(body))


def _encodable(answer: dict[str, Any]) -> dict[str, Any]:
    try:
        result_fragment(answer)
    except ProviderError as error:
        return error_response(error)
    return answer
