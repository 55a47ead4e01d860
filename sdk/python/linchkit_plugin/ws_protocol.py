"""The WebSocket binding of the plugin protocol: frames around the one JSON envelope.

Both sides import this module (the host's ``providers.websocket`` and the SDK's
``linchkit_plugin.ws_server``); it holds no I/O and imports no WebSocket library, so a
plugin that never speaks WebSocket pays nothing for it. ``docs/protocol.md`` ("WebSocket
binding") describes the frames; ``proto/websocket.schema.json`` is their JSON Schema.

Every frame is one JSON object in one WebSocket message, with ``type``:

    host → plugin   call, stream, credit, cancel, health, event, dropped, welcome
    plugin → host   hello, response, chunk, health, event, dropped, error

``id`` is an integer the host picks for a call, unique on its connection; everything
that answers the call carries it. ``request`` and ``response`` are the envelopes of every
other transport, unchanged.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from linchkit_plugin.errors import DispatchError, InvalidParams, ProviderError
from linchkit_plugin.wire import MAX_PARAMS_DEPTH, PROTOCOL_VERSION, encode_json, nested_deeper_than

__all__ = [
    "CLOSE_BAD_HELLO",
    "CLOSE_GOING_AWAY",
    "CLOSE_NORMAL",
    "CLOSE_SERVICE_RESTART",
    "CLOSE_WRONG_PLUGIN",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "GOAWAY_GRACE",
    "HELLO_TIMEOUT",
    "MAX_ANNOUNCED_CAP",
    "MAX_FRAME_DEPTH",
    "MAX_MESSAGE_BYTES_HEADER",
    "MIN_ANNOUNCED_CAP",
    "PLUGIN_ID_HEADER",
    "PLUGIN_VERSION_HEADER",
    "SHOWN_REASON_CHARS",
    "STREAM_WINDOW",
    "FrameError",
    "UnknownProtocol",
    "announced_cap",
    "checked_hello",
    "decode_frame",
    "encode_frame",
    "error_frame",
    "hello_frame",
    "shown_close_reason",
]

#: Close codes: RFC 6455's, and ours in the private 4000-4999 range.
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
#: A reload replaced the plugin version the connection serves (another version of its id,
#: or the same one on a changed target, takes connections now): dial again.
CLOSE_SERVICE_RESTART: Final = 1012
#: The first frame was not a valid ``hello``, or not within ``HELLO_TIMEOUT``.
CLOSE_BAD_HELLO: Final = 4400
#: The ``hello`` names a plugin (id, version, methods) other than the one admitted, or
#: speaks a protocol version the gateway does not: the same ``hello`` would be refused again.
CLOSE_WRONG_PLUGIN: Final = 4403

#: A message larger than this closes the connection (1009): the envelope's 8 MiB, as HTTP.
DEFAULT_MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024
#: Seconds between pings; a peer that does not answer within half of it is gone. Detects a
#: half-open TCP connection (no FIN ever comes) within 1.5 heartbeats.
DEFAULT_HEARTBEAT: Final = 10.0
#: How long a stopping plugin waits, after ``goaway``, for the host to finish its calls and
#: close the connection, before closing it itself (1001) with whatever is still running:
#: the stop's grace, which ``LINCHKIT_PLUGIN_STOP_GRACE_MS`` sets in the SDK's executables
#: (``linchkit_plugin.stopping``).
GOAWAY_GRACE: Final = 5.0
#: Seconds a new connection has to send its ``hello``.
HELLO_TIMEOUT: Final = 10.0

#: Chunks a plugin may send on a stream before the host grants more with a ``credit``
#: frame (flow control per stream: a slow consumer slows its own stream, not the
#: connection's other calls, and the host holds at most this many chunks per stream).
STREAM_WINDOW: Final = 256

#: Levels a frame may nest: a call's params may nest ``MAX_PARAMS_DEPTH`` (as on every
#: transport) under the frame's object and its request's.
MAX_FRAME_DEPTH: Final = MAX_PARAMS_DEPTH + 2

#: Headers of the upgrade request a plugin dialling the gateway sends (reverse mode).
PLUGIN_ID_HEADER: Final = "X-Plugin-Id"
PLUGIN_VERSION_HEADER: Final = "X-Plugin-Version"

#: The largest message the host reads, announced so that a plugin refuses its own larger
#: answer as that call's ``too_large`` error instead of sending it (which would close the
#: connection, 1009, failing every call on it): a header of the host's upgrade request in
#: dial mode; in reverse mode the ``welcome`` frame's ``max_message_bytes``.
MAX_MESSAGE_BYTES_HEADER: Final = "LinchKit-Max-Message-Bytes"
#: The caps a side may announce (that header, a ``welcome``'s or a ``hello``'s
#: ``max_message_bytes``): at least what a call's error answer needs, at most the largest
#: integer every SDK's JSON reads exactly. Any other announcement is ignored.
MIN_ANNOUNCED_CAP: Final = 1024
MAX_ANNOUNCED_CAP: Final = 2**53


class FrameError(ProviderError):
    """A message that is not a frame of this protocol (not JSON, not an object, no type)."""


class UnknownProtocol(InvalidParams):
    """A ``hello`` in a protocol version this side does not speak (``details["protocol"]``):
    unlike a malformed one, sending it again would get the same answer."""


def encode_frame(frame: dict[str, Any]) -> bytes:
    """``frame`` as the bytes of one text message; params JSON cannot carry raise
    ``InvalidParams`` (the checks of ``wire.encode_json``)."""
    return encode_json(frame)


def decode_frame(data: str | bytes) -> dict[str, Any]:
    """One received message as a frame; raises ``FrameError`` when it is none."""
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        # orjson refuses what JSON cannot carry both ways (1e400, a lone surrogate, not
        # UTF-8, over 1,024 levels); its message never quotes the input.
        if "depth" in str(error):
            raise FrameError(f"a frame nested deeper than {MAX_FRAME_DEPTH} levels") from None
        raise FrameError(f"a WebSocket message that is not JSON: {str(error)[:120]}") from None
    # Deeper than the limit needs more brackets than that: count them at C speed first.
    raw = data.encode() if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") > MAX_FRAME_DEPTH and nested_deeper_than(
        frame, MAX_FRAME_DEPTH
    ):
        raise FrameError(f"a frame nested deeper than {MAX_FRAME_DEPTH} levels")
    if type(frame) is not dict or type(frame.get("type")) is not str:
        raise FrameError("a WebSocket message that is not a JSON object with a string 'type'")
    return frame


def error_frame(error: DispatchError, call_id: Any = None) -> bytes:
    """An ``error`` frame: a message the peer sent could not be used."""
    frame: dict[str, Any] = {"type": "error", "error": error.to_wire()}
    if type(call_id) is int:
        frame["id"] = call_id
    return encode_frame(frame)


#: The most of a peer's close reason shown, once escaped: a reason is at most 123 bytes,
#: which escaping may make four times longer.
SHOWN_REASON_CHARS = 200


def shown_close_reason(reason: str) -> str:
    """A close reason the peer sent, as a log line or a terminal may show it: every
    character that does not print (ESC, a newline, a bidi override) escaped as Python
    writes it (``\\x1b``, ``\\n``, ``\\u202e``), and cut to ``SHOWN_REASON_CHARS``. The
    peer chose those bytes; the operator's terminal must not run them."""
    shown = "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in reason
    )
    return shown if len(shown) <= SHOWN_REASON_CHARS else shown[:SHOWN_REASON_CHARS] + "…"


def hello_frame(
    plugin_id: str,
    version: str,
    methods: list[str],
    *,
    streaming: list[str] | None = None,
    runtime: str = "python",
    max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
) -> bytes:
    """The first frame a plugin sends on every connection: who it is, and the largest
    message it reads (``max_message_bytes``; None: it says nothing), which the host then
    sends none over."""
    hello: dict[str, Any] = {
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "id": plugin_id,
        "version": version,
        "runtime": runtime,
        "methods": sorted(methods),
        "streaming": sorted(streaming or ()),
    }
    if max_message_bytes is not None:
        hello["max_message_bytes"] = max_message_bytes
    return encode_frame(hello)


def announced_cap(value: Any) -> int | None:
    """``value`` (a frame's ``max_message_bytes``) as the largest message its sender reads,
    or None if it is no valid one: absent, not a JSON integer (a string, 12.5, ``true``),
    or outside ``MIN_ANNOUNCED_CAP`` to ``MAX_ANNOUNCED_CAP``."""
    if type(value) is int and MIN_ANNOUNCED_CAP <= value <= MAX_ANNOUNCED_CAP:
        return value
    return None


def checked_hello(frame: dict[str, Any]) -> dict[str, Any]:
    """``frame`` if it is a ``hello`` this side understands; ``InvalidParams`` otherwise."""
    if frame.get("type") != "hello":
        raise InvalidParams(f"the first frame must be 'hello', not {frame.get('type')!r:.40}")
    protocol = frame.get("protocol")
    # Exactly an integer: Python would take ``true`` and ``1.0`` for 1.
    if type(protocol) is not int:
        shown = orjson.dumps(protocol)[:20].decode(errors="ignore")
        raise InvalidParams(f"hello's 'protocol' must be an integer, not {shown}")
    if protocol != PROTOCOL_VERSION:
        raise UnknownProtocol(
            f"hello speaks protocol {protocol}; this side speaks {PROTOCOL_VERSION}",
            details={"protocol": protocol},
        )
    for key in ("id", "version"):
        value = frame.get(key)
        if type(value) is not str or not 0 < len(value) <= 200:
            raise InvalidParams(f"hello needs '{key}', a string of 1-200 characters")
    methods = frame.get("methods", [])
    if type(methods) is not list or not all(type(m) is str for m in methods):
        raise InvalidParams("hello 'methods' must be a list of strings")
    return frame
