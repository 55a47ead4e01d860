"""The first frame of a new WebSocket connection, its ``hello``, read and checked before a
channel is made of the connection: by the dialer (dial mode) and by the provider for a
plugin that dials in (reverse mode). Only the fields read are kept, each list cut.
"""

from __future__ import annotations

from typing import Any

from aiohttp import WSCloseCode, WSMsgType

from linchkit_plugin.errors import DispatchError, InvalidParams, TargetUnavailable
from linchkit_plugin.ws_protocol import (
    HELLO_TIMEOUT,
    UnknownProtocol,
    announced_cap,
    checked_hello,
    decode_frame,
)
from providers.served import MAX_SERVED_METHODS
from providers.websocket.writer import Socket

__all__ = ["read_hello"]


def _kept(hello: dict[str, Any]) -> dict[str, Any]:
    """What is kept of a checked hello for the connection's life: the fields read, each
    list cut just past what is believed of it (``providers.served``), never what else the
    plugin padded it with. Decoded, a hello of a few MiB of JSON is over 100 MB of objects."""
    kept: dict[str, Any] = {
        key: hello[key] for key in ("type", "protocol", "id", "version") if key in hello
    }
    if type(runtime := hello.get("runtime")) is str:
        kept["runtime"] = runtime[:200]
    for key in ("methods", "streaming"):
        listed = hello.get(key)
        if type(listed) is list:
            # One past the most believed: a longer list is still seen as too long.
            kept[key] = [name for name in listed[: MAX_SERVED_METHODS + 1] if type(name) is str]
    if (reads := announced_cap(hello.get("max_message_bytes"))) is not None:
        kept["max_message_bytes"] = reads
    return kept


async def read_hello(socket: Socket) -> dict[str, Any]:
    """The first frame of a new connection, a checked ``hello``: ``TargetUnavailable`` if
    none comes within ``HELLO_TIMEOUT``, ``InvalidParams`` if it is not a valid one
    (``UnknownProtocol``, as it is, for a protocol version this side does not speak)."""
    try:
        message = await socket.receive(timeout=HELLO_TIMEOUT)
    except TimeoutError:
        raise TargetUnavailable(f"no hello within {HELLO_TIMEOUT:.0f} s") from None
    if message.type is WSMsgType.ERROR:
        raise _failed_on_hello(message.data)
    if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
        raise TargetUnavailable(f"closed before its hello ({message.type.name})")
    try:
        return _kept(checked_hello(decode_frame(message.data)))
    except UnknownProtocol:
        raise
    except DispatchError as error:
        raise InvalidParams(f"broke the protocol: {error.message}") from None


def _failed_on_hello(error: BaseException) -> DispatchError:
    """Why reading the hello failed. A hello lists every method the plugin serves, so one
    of many methods can be over a small ``max_message_bytes``: said as the setting to
    change (it read ``closed before its hello (ERROR)``), not as an outage."""
    if getattr(error, "code", None) == WSCloseCode.MESSAGE_TOO_BIG:
        return InvalidParams(
            f"its hello is larger than the target's max_message_bytes ({error}); a plugin"
            " of many methods needs it raised"
        )
    return TargetUnavailable(f"the connection failed before its hello: {error}")
