"""A call the host sends too late for a plugin's graceful stop costs no call in flight.

A server stopping gracefully sends GOAWAY; the two-step servers (h2 under tonic, grpc-go,
grpc-java) name the largest stream id and send a PING, and once the client acknowledges
it they send a second GOAWAY naming the last stream they took. A stream the client opened
after that is late: the server is to ignore its frames (RFC 9113, section 6.8), and the
client, told by the GOAWAY that it was never taken, sends the call again elsewhere (the
dispatcher reads it as never sent). The calls the server took must still be answered.

grpc core, the dispatcher's channel, writes a late stream whenever its write races the
GOAWAY: a call it numbered before it read the GOAWAY goes out after its PING
acknowledgement, in the same write, as HEADERS, a WINDOW_UPDATE on the call's stream,
then DATA (its writer's order: ping acks first, then each stream's frames). Seen on the
wire (strace of a Rust plugin under the load of test_graceful_stop.py): h2 ignored the late
HEADERS, took the late WINDOW_UPDATE for one on an idle stream, a protocol error, and
closed the connection under the 11 calls it had taken and not yet answered, which the
host could only count as lost. Netty, under grpc-java, refuses the late HEADERS, then
takes the late WINDOW_UPDATE or DATA for a frame on a stream that never existed, and
closes the connection the same way; each of those SDKs cuts such frames out before its
HTTP/2 library reads them.

No grpc client sends that write on cue, so this test speaks HTTP/2 frame by frame (with
hyperframe and hpack, the h2 package's own): one slow call in flight, SIGTERM, and the
late call written exactly as grpc core writes it, right after the acknowledgement of the
server's PING (or after its GOAWAY, for a server that sends no PING).
"""

from __future__ import annotations

import asyncio
import signal
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from linchkit_plugin._proto import plugin_pb2
from linchkit_plugin.handshake import NOT_RUN_TRAILER
from tests.conformance.conftest import LANGUAGES, _start_service, _stop_service, executable

pytestmark = [pytest.mark.toolchain, pytest.mark.slow]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CALL_PATH = "/linchkit.plugin.v1.PluginService/Call"
MAX_STREAM_ID = 2**31 - 1
REFUSED_STREAM = 0x7
#: The call in flight when the plugin is told to stop: long enough to still be running
#: when the late call arrives.
IN_FLIGHT_MS = 500
#: How long the plugin may take to answer what it took, stop and close the connection.
STOP_WITHIN = 15.0


def _call(stream: int, method: str, params: bytes, encoder: hpack.Encoder) -> list[bytes]:
    """A ``Call`` on ``stream`` as grpc core writes one: HEADERS, a WINDOW_UPDATE on the
    stream, then its message in one DATA frame."""
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", CALL_PATH),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    message = plugin_pb2.CallRequest(
        v=1,
        plugin="example",
        method=method,
        params_json=params,
        context=plugin_pb2.CallContext(request_id=f"late-{stream}", deadline_ms=10_000),
    ).SerializeToString()
    return [
        HeadersFrame(stream, encoder.encode(headers), flags=["END_HEADERS"]).serialize(),
        WindowUpdateFrame(stream, window_increment=5).serialize(),
        DataFrame(
            stream, b"\x00" + struct.pack(">I", len(message)) + message, flags=["END_STREAM"]
        ).serialize(),
    ]


@dataclass
class Stream:
    """What the server sent on one stream."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    data: bytes = b""
    ended: bool = False
    reset: int | None = None


async def _frames(reader: asyncio.StreamReader) -> AsyncIterator[Frame]:
    """The server's frames until it closes the connection."""
    while True:
        try:
            head = await reader.readexactly(9)
            frame, length = Frame.parse_frame_header(memoryview(head))
            frame.parse_body(memoryview(await reader.readexactly(length)))
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        yield frame


class Client:
    """One HTTP/2 connection to the plugin, frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.frames = _frames(reader)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.streams: dict[int, Stream] = {}
        self.goaways: list[GoAwayFrame] = []
        self._block = b""

    def read(self, frame: Frame) -> None:
        """Keep what ``frame`` says of a stream or of the connection's end."""
        stream = self.streams.setdefault(frame.stream_id, Stream())
        if isinstance(frame, HeadersFrame | ContinuationFrame):
            self._block += frame.data
            if "END_HEADERS" in frame.flags:
                decoded = self.decoder.decode(self._block)
                stream.headers += [(str(name), str(value)) for name, value in decoded]
                self._block = b""
        elif isinstance(frame, DataFrame):
            stream.data += frame.data
        elif isinstance(frame, RstStreamFrame):
            stream.reset = frame.error_code
        elif isinstance(frame, GoAwayFrame):
            self.goaways.append(frame)
        elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            self.writer.write(SettingsFrame(0, flags=["ACK"]).serialize())
        if isinstance(frame, HeadersFrame | DataFrame) and "END_STREAM" in frame.flags:
            stream.ended = True

    def ending(self, stream_id: int) -> str:
        """How the call on ``stream_id`` ended for the host: answered, refused unrun (the
        plugin's "not run", REFUSED_STREAM, or above the last stream a GOAWAY said was
        taken), or lost."""
        stream = self.streams.get(stream_id, Stream())
        said = dict(stream.headers)
        if stream.ended and said.get("grpc-status") == "0":
            reply = plugin_pb2.CallReply.FromString(stream.data[5:])
            return "answered" if reply.ok else f"lost: answered ok=false {reply.error}"
        if stream.ended and said.get("grpc-status") == "14" and NOT_RUN_TRAILER in said:
            return "refused: not run"
        if stream.reset == REFUSED_STREAM:
            return "refused: REFUSED_STREAM"
        if self.goaways and stream_id > min(goaway.last_stream_id for goaway in self.goaways):
            return "refused: above the GOAWAY's last stream"
        return f"lost: {said or 'no answer'}, reset {stream.reset}, goaways " + ", ".join(
            f"(last {goaway.last_stream_id}, code {goaway.error_code})" for goaway in self.goaways
        )


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_call_sent_too_late_for_a_graceful_stop_costs_no_call_in_flight(
    language: str,
) -> None:
    service, address = await _start_service(executable(language))
    try:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        client = Client(reader, writer)
        in_flight = _call(1, "sleep", b'{"ms": %d}' % IN_FLIGHT_MS, client.encoder)
        writer.write(
            PREFACE
            + SettingsFrame(0).serialize()
            + b"".join(in_flight)
            + PingFrame(0, b"in-order").serialize()
        )
        async with asyncio.timeout(STOP_WITHIN):
            async for frame in client.frames:  # its acknowledgement: the call was read
                client.read(frame)
                if isinstance(frame, PingFrame) and "ACK" in frame.flags:
                    break

        service.send_signal(signal.SIGTERM)
        late = False
        async with asyncio.timeout(STOP_WITHIN):
            async for frame in client.frames:
                client.read(frame)
                pinged = isinstance(frame, PingFrame) and "ACK" not in frame.flags
                capped = isinstance(frame, GoAwayFrame) and frame.last_stream_id < MAX_STREAM_ID
                if (pinged or capped) and not late:
                    late = True
                    acknowledgement = (
                        PingFrame(0, frame.opaque_data, flags=["ACK"]).serialize()
                        if isinstance(frame, PingFrame)
                        else b""
                    )
                    call = _call(3, "echo", b'{"n": 1}', client.encoder)
                    writer.write(acknowledgement + b"".join(call))
        writer.close()
    finally:
        await _stop_service(service)

    assert late, f"{language}: the plugin sent no GOAWAY ({client.goaways})"
    assert client.ending(1) in ("answered", "refused: not run"), client.ending(1)
    assert client.ending(3).startswith(("answered", "refused")), client.ending(3)
