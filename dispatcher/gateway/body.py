"""A request's params: its JSON body, read under the gateway's limits.

Every refusal that can be decided from the headers is decided before a byte of the body
is read (the content type, a ``Content-Length`` over the limit); a chunked body is counted
as it arrives and cut off at the limit; the whole body must arrive within
``body_timeout``. A refusal made before the body was read whole closes the connection
(``Refused.close``), so the unread rest is never parsed as the next request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from dispatcher.gateway.settings import GatewaySettings
from linchkit_plugin.errors import DeadlineExceeded, DispatchError, InvalidParams
from linchkit_plugin.wire import nested_deeper_than

__all__ = ["Refused", "read_params"]

_READ_CHUNK = 64 * 1024


class Refused(Exception):
    """An answer decided before the call runs, with the status the table does not give."""

    def __init__(self, error: DispatchError, *, status: int | None = None, close: bool = False):
        super().__init__(error.message)
        self.error = error
        self.status = status
        self.close = close


async def read_params(request: web.Request, settings: GatewaySettings) -> Any:
    """The params the body carries (``{}`` for an empty body), or raise ``Refused``."""
    declared = request.content_length
    if declared == 0 or (declared is None and not request.body_exists):
        return {}
    _check_content_type(request)
    _check_content_encoding(request)
    if declared is not None and declared > settings.max_body_bytes:
        raise Refused(_too_big(f"Content-Length {declared}", settings), status=413, close=True)
    try:
        if declared is not None and request.content.is_eof():
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
    except web.HTTPRequestEntityTooLarge:
        # Content-Length was the compressed size; aiohttp's read counts what it inflates to.
        inflated = _too_big("the request body, decompressed,", settings)
        raise Refused(inflated, status=413, close=True) from None
    except web.RequestPayloadError:  # a Content-Encoding the bytes do not match
        encoding = request.headers.get("Content-Encoding", "")[:20]
        broken = InvalidParams(f"the request body is not valid {encoding!r}-encoded data")
        raise Refused(broken, close=True) from None
    if not raw:
        return {}
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
    if request.content_type != "application/json":
        shown = request.headers.get("Content-Type", "")[:100] or "none"
        refusal = InvalidParams(
            f"the request body must be 'Content-Type: application/json', not {shown!r}"
        )
        raise Refused(refusal, status=415, close=True)


#: The codings aiohttp decodes (one at a time); any other would reach the JSON parser
#: still encoded, or be taken as plain JSON while the client meant otherwise.
_DECODED_ENCODINGS = frozenset({"identity", "gzip", "deflate", "br", "zstd"})


def _check_content_encoding(request: web.Request) -> None:
    sent = request.headers.get("Content-Encoding")
    if sent is None or sent.strip().lower() in _DECODED_ENCODINGS:
        return
    refusal = InvalidParams(
        f"Content-Encoding {sent[:40]!r} is not one this gateway decodes"
        " (gzip, deflate, br, zstd or none)"
    )
    raise Refused(refusal, status=415, close=True)


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
