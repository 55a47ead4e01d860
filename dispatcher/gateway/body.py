"""A request's params: its JSON body, read under the gateway's limits.

Every refusal that can be decided from the headers is decided before a byte of the body
is read (the content type, a ``Content-Encoding`` it does not decode, a ``Content-Length``
over the limit); a chunked body is counted as it arrives and cut off at the limit; the
whole body must arrive within ``body_timeout``. A refusal made before the body was read
whole closes the connection (``Refused.close``), so the unread rest is never parsed as the
next request.

A compressed body (``Content-Encoding: gzip``, ``deflate``, or ``zstd`` where the
``zstandard`` package is installed) is decoded here, not by aiohttp (the app's
``auto_decompress`` is off: aiohttp 3.14 decodes zstd only with ``backports.zstd``,
answering a plain-text 400 otherwise, and brotli only with ``Brotli``). The compressed
bytes are held to ``max_body_bytes``, and so is what they decode to: decoding stops at
the limit, so a bomb costs at most that much memory and is answered 413. Any other
coding, ``br`` among them, is 415 with the ``Accept-Encoding`` this gateway takes.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import orjson
from aiohttp import web

from dispatcher.gateway.settings import GatewaySettings
from linchkit_plugin.encodings import SUPPORTED, UndecodableBody, decode
from linchkit_plugin.errors import DeadlineExceeded, DispatchError, InvalidParams
from linchkit_plugin.wire import nested_deeper_than

__all__ = ["ACCEPT_ENCODING", "DECODED_ENCODINGS", "Refused", "read_params"]

_READ_CHUNK = 64 * 1024

#: The codings a request body may come in (besides none): zstd only where ``zstandard``
#: imports (the ``zstd`` extra).
DECODED_ENCODINGS: tuple[str, ...] = (*SUPPORTED, "deflate")
#: What a 415 for a coding says the gateway takes (RFC 9110 §15.5.16).
ACCEPT_ENCODING = ", ".join(DECODED_ENCODINGS)


class Refused(Exception):
    """An answer decided before the call runs, with the status the table does not give
    (and any header it needs besides)."""

    def __init__(
        self,
        error: DispatchError,
        *,
        status: int | None = None,
        close: bool = False,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(error.message)
        self.error = error
        self.status = status
        self.close = close
        self.headers = headers or {}


async def read_params(request: web.Request, settings: GatewaySettings) -> Any:
    """The params the body carries (``{}`` for an empty body), or raise ``Refused``."""
    declared = request.content_length
    if declared == 0 or (declared is None and not request.body_exists):
        return {}
    _check_content_type(request)
    coding = _content_coding(request)
    if declared is not None and declared > settings.max_body_bytes:
        raise Refused(_too_big(f"Content-Length {declared}", settings), status=413, close=True)
    try:
        if declared is not None and request.content.is_eof() and coding is None:
            # The whole body came with the head (the usual small call): nothing to wait
            # for, so no timer is armed and cancelled for it.
            raw = await request.read()
            return parse_json(raw, settings.max_depth) if raw else {}
        async with asyncio.timeout(settings.body_timeout):
            if declared is not None:  # known and within the limit: one read, aiohttp's
                raw = await request.read()
            else:  # chunked: counted as it arrives
                raw = await _read_limited(request, settings)
    except TimeoutError:
        late = DeadlineExceeded(
            f"the request body did not arrive within {settings.body_timeout:g} s"
        )
        raise Refused(late, status=408, close=True) from None
    except web.HTTPRequestEntityTooLarge:  # over client_max_size: Content-Length lied
        raise Refused(_too_big("the request body", settings), status=413, close=True) from None
    except web.RequestPayloadError:  # chunked framing that breaks off or makes no sense
        broken = InvalidParams("the request body's chunked framing is broken")
        raise Refused(broken, close=True) from None
    if not raw:
        return {}
    if coding is not None:
        raw = await _decoded(raw, coding, settings)
    return parse_json(raw, settings.max_depth)


def parse_json(raw: bytes, max_depth: int) -> Any:
    """``raw`` as JSON nested at most ``max_depth`` levels, or ``InvalidParams`` in ``Refused``."""
    # Nesting deeper than max_depth needs more brackets than that: count them (at C speed)
    # before parsing anything, so ordinary bodies pay nothing for the check.
    deep = raw.count(b"[") + raw.count(b"{") > max_depth
    try:
        params = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        if "depth" in str(error):  # beyond orjson's own 1,024 levels
            raise Refused(_too_deep(max_depth)) from None
        raise Refused(InvalidParams(f"the request body is not JSON: {error}")) from None
    if deep:
        _check_depth(params, max_depth)
    return params


def _check_content_type(request: web.Request) -> None:
    sent = request.headers.get("Content-Type")
    if sent == "application/json":  # the common spelling, without parsing it
        return
    try:
        kind = request.content_type
    except (IndexError, ValueError):  # aiohttp's parser fails on some (";0*"): not JSON
        kind = None
    if kind != "application/json":
        shown = request.headers.get("Content-Type", "")[:100] or "none"
        refusal = InvalidParams(
            f"the request body must be 'Content-Type: application/json', not {shown!r}"
        )
        raise Refused(refusal, status=415, close=True)


def _content_coding(request: web.Request) -> str | None:
    """The coding the body is in (None: as it is), or 415 for one this gateway does not
    decode (one at a time): any other would reach the JSON parser still encoded, or be
    taken as plain JSON while the client meant otherwise."""
    sent = request.headers.get("Content-Encoding")
    if sent is None:
        return None
    coding = sent.strip().lower()
    if coding == "identity":
        return None
    if coding in DECODED_ENCODINGS:
        return coding
    refusal = InvalidParams(
        f"Content-Encoding {sent[:40]!r} is not one this gateway decodes"
        f" ({ACCEPT_ENCODING} or none)"
    )
    raise Refused(refusal, status=415, close=True, headers={"Accept-Encoding": ACCEPT_ENCODING})


async def _decoded(raw: bytes, coding: str, settings: GatewaySettings) -> bytes:
    """``raw`` decoded from ``coding``, at most ``max_body_bytes`` of it, or ``Refused``:
    413 past the limit, 400 for bytes not valid in the coding. In a worker thread (zlib
    and zstandard release the GIL): what a small body decodes to is bounded only by the
    limit, which a host may set high."""
    limit = settings.max_body_bytes
    try:
        return await asyncio.to_thread(_decode, raw, coding, limit)
    except UndecodableBody as error:
        if error.kind == "too_large":
            inflated = _too_big("the request body, decompressed,", settings)
            raise Refused(inflated, status=413) from None
        broken = InvalidParams(f"the request body cannot be decoded: {error.message}")
        raise Refused(broken) from None


def _decode(raw: bytes, coding: str, limit: int) -> bytes:
    if coding == "deflate":
        return _inflate(raw, limit)
    return decode(raw, coding, limit)


def _inflate(raw: bytes, limit: int) -> bytes:
    """``deflate`` as clients send it, with zlib's header (RFC 9110) or without (raw
    deflate, which aiohttp took too: the header's first byte names method 8), at most
    ``limit`` bytes of output."""
    window = zlib.MAX_WBITS if raw[0] & 0x0F == 8 else -zlib.MAX_WBITS
    decompressor = zlib.decompressobj(window)
    try:
        # max_length bounds what zlib writes: a bomb stops at limit + 1.
        output = decompressor.decompress(raw, limit + 1)
    except zlib.error as error:
        raise UndecodableBody("corrupt", f"the body is not valid deflate: {error}") from None
    if len(output) > limit:
        raise UndecodableBody("too_large", f"the body is over {limit} bytes once decompressed")
    if not decompressor.eof:
        raise UndecodableBody("corrupt", "the deflate body is cut short")
    if decompressor.unused_data:
        raise UndecodableBody("corrupt", "the deflate body has bytes after its end")
    return output


async def _read_limited(request: web.Request, settings: GatewaySettings) -> bytes:
    limit = settings.max_body_bytes
    chunks: list[bytes] = []
    size = 0
    content = request.content
    while True:
        chunk = await content.read(_READ_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise Refused(_too_big("the request body", settings), status=413, close=True)
        chunks.append(chunk)


def _too_big(what: str, settings: GatewaySettings) -> InvalidParams:
    return InvalidParams(
        f"{what} is over this gateway's {settings.max_body_bytes}-byte limit (--max-body-bytes)"
    )


def _too_deep(max_depth: int) -> InvalidParams:
    return InvalidParams(f"params are nested deeper than {max_depth} levels")


def _check_depth(params: Any, max_depth: int) -> None:
    if nested_deeper_than(params, max_depth):
        raise Refused(_too_deep(max_depth))
