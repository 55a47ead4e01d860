"""provider: websocket: a connection the dispatcher drops is gone at once, and a plugin
that trickles a frame is cut off. The plugins here are raw sockets on loopback that
complete the WebSocket upgrade and then misbehave: one never reads (a small receive
buffer, so the dispatcher's writes stall), one sends a frame a byte at a time. Whether
the dispatcher still holds the connection is read from the process's own descriptors
(``/proc/self/fd`` and ``/proc/net/tcp``), not from aiohttp's state.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import logging
import os
import re
import socket
import ssl
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import aiohttp
import orjson
import pytest
import trustme
from aiohttp import web

from dispatcher import Dispatcher, TargetUnavailable
from dispatcher.gateway import GatewaySettings
from dispatcher.gateway.app import create_app
from linchkit_plugin.ws_protocol import PLUGIN_ID_HEADER, PLUGIN_VERSION_HEADER, hello_frame
from providers.websocket.closing import let_go
from tests.conftest import manifest

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/net/tcp"), reason="reads the process's sockets from /proc"
)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TOKEN = "drop-token-0123456789"
BLOB = "z" * (16 * 1024 * 1024)  # more than the kernel's send and receive buffers hold
TICK = orjson.dumps({"type": "event", "event": "tick", "data": None})
#: How long a dropped connection's descriptor may outlive the drop: a few turns of the loop.
AT_ONCE = 0.1

# -- what the process holds ---------------------------------------------------------------


def _hex_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}"


def tcp_inode(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The inode of the IPv4 TCP socket from ``local`` to ``remote``, if the kernel has one."""
    wanted = (_hex_address(local), _hex_address(remote))
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if (fields[1], fields[2]) == wanted and fields[9] != "0":
                return int(fields[9])
    return None


def tcp_inodes_to(remote: tuple[str, int]) -> set[int]:
    """The inodes of the IPv4 TCP sockets connected to ``remote``."""
    wanted = _hex_address(remote)
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return {int(row[9]) for row in rows if row[2] == wanted and row[9] != "0"}


def held(inode: int) -> bool:
    """Whether a descriptor of this process still refers to socket ``inode``."""
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == f"socket:[{inode}]":
                return True
    return False


# -- raw WebSocket ------------------------------------------------------------------------


def ws_frame(
    payload: bytes, *, masked: bool, opcode: int = 0x1, length: int | None = None
) -> bytes:
    """A final frame of ``payload``; ``length``: the length its header claims."""
    size = len(payload) if length is None else length
    head = bytes([0x80 | opcode])
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 65536:
        head += bytes([mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_head(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise ConnectionError("closed during the upgrade")
        data += chunk
    return data


def small_receive_buffer() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    return sock


#: What a raw plugin does once the upgrade is done: ``behave(send)``, where ``send(payload)``
#: writes bytes as they are.
Behaviour = Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]


def talking_but_deaf(masked: bool) -> Behaviour:
    """Sends an event every 10 ms and reads nothing: the heartbeat never pings it."""

    async def behave(send: Callable[[bytes], Awaitable[None]]) -> None:
        while True:
            await send(ws_frame(TICK, masked=masked))
            await asyncio.sleep(0.01)

    return behave


def trickling(masked: bool) -> Behaviour:
    """Starts a 1 MiB event and sends it one byte per 100 ms (the heartbeat never pings)."""

    async def behave(send: Callable[[bytes], Awaitable[None]]) -> None:
        prefix = b'{"type": "event", "event": "slow", "data": "'
        start = ws_frame(b"", masked=masked, length=1024 * 1024)
        await send(start + (b"\0\0\0\0" if masked else b"") + prefix[:1])
        for byte in prefix[1:] + b"x" * (1024 * 1024):
            await asyncio.sleep(0.1)
            await send(bytes([byte]))  # masked with zeros: as it is

    return behave


def fragmenting(masked: bool) -> Behaviour:
    """Sends an event in fragments of one byte, 50 ms apart, each followed by a ping and
    an unsolicited pong: signs of life aiohttp takes between fragments, while no frame
    ever comes whole."""

    def frame(payload: bytes, opcode: int, final: bool) -> bytes:
        whole = ws_frame(payload, masked=masked, opcode=opcode)
        return whole if final else bytes([whole[0] & 0x7F]) + whole[1:]

    async def behave(send: Callable[[bytes], Awaitable[None]]) -> None:
        body = b'{"type": "event", "event": "slow", "data": "' + b"x" * 100_000
        await send(frame(body[:1], 0x1, final=False))
        for byte in body[1:]:
            await asyncio.sleep(0.05)
            await send(
                frame(bytes([byte]), 0x0, final=False)
                + frame(b"", 0x9, final=True)
                + frame(b"", 0xA, final=True)
            )

    return behave


@contextlib.asynccontextmanager
async def raw_plugin_server(
    host: str, behave: Behaviour, *, plugin_id: str = "raw", hello_after: float = 0.0
) -> AsyncIterator[tuple[str, int]]:
    """A plugin at ``host``: upgrades, says hello (``hello_after`` seconds later), then
    ``behave``; never reads again."""
    loop = asyncio.get_running_loop()
    listener = small_receive_buffer()  # accepted sockets take it on
    listener.bind((host, 0))
    listener.listen()
    accepted: list[socket.socket] = []
    tasks: set[asyncio.Task[None]] = set()

    async def serve(conn: socket.socket) -> None:
        request = await read_head(conn)
        key = re.search(rb"(?i)sec-websocket-key:\s*(\S+)", request)
        assert key is not None
        accept = base64.b64encode(hashlib.sha1(key.group(1) + _GUID).digest())
        await loop.sock_sendall(
            conn,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n",
        )
        # Says no read cap: the calls that stall its socket are larger than an SDK reads.
        hello = hello_frame(plugin_id, "1.0.0", ["echo"], max_message_bytes=None)
        await asyncio.sleep(hello_after)
        await loop.sock_sendall(conn, ws_frame(hello, masked=False))
        with contextlib.suppress(ConnectionError):
            await behave(lambda data: loop.sock_sendall(conn, data))

    async def accepting() -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            accepted.append(conn)
            tasks.add(asyncio.ensure_future(serve(conn)))

    acceptor = asyncio.ensure_future(accepting())
    try:
        yield listener.getsockname()
    finally:
        for task in (acceptor, *tasks):
            task.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
        for each in (listener, *accepted):
            each.close()


@contextlib.asynccontextmanager
async def raw_plugin_client(
    gateway: tuple[str, int], behave: Behaviour, *, version: str = "1.0.0"
) -> AsyncIterator[socket.socket]:
    """A plugin that dials the gateway, says hello, then ``behave``s; never reads again."""
    loop = asyncio.get_running_loop()
    sock = small_receive_buffer()
    await loop.sock_connect(sock, gateway)
    key = base64.b64encode(os.urandom(16))
    await loop.sock_sendall(
        sock,
        b"GET /v1/plugins/connect HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
        + key
        + b"\r\n"
        + f"{PLUGIN_ID_HEADER}: raw\r\n{PLUGIN_VERSION_HEADER}: 1.0.0\r\n".encode()
        + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode(),
    )
    head = await read_head(sock)
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    await loop.sock_sendall(
        sock, ws_frame(hello_frame("raw", version, ["echo"], max_message_bytes=None), masked=True)
    )
    task = asyncio.ensure_future(behave(lambda data: loop.sock_sendall(sock, data)))
    try:
        yield sock
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sock.close()


# -- the dispatcher -----------------------------------------------------------------------


def dialling(address: tuple[str, int], heartbeat_ms: int) -> Dispatcher:
    return Dispatcher(manifest(dialled("raw", address, heartbeat_ms)))


def dialled(plugin_id: str, address: tuple[str, int], heartbeat_ms: int) -> dict[str, Any]:
    host, port = address
    return {
        "id": plugin_id,
        "version": "1.0.0",
        "target": {
            "provider": "websocket",
            "url": f"ws://{host}:{port}/",
            "heartbeat_ms": heartbeat_ms,
            "max_message_bytes": 32 * 1024 * 1024,
            "reconnect_backoff_ms": 5_000,
            "reconnect_backoff_max_ms": 5_000,
        },
        "defaults": {"timeout_ms": 10_000},
        "methods": {"echo": {}},
    }


async def until(condition: Callable[[], Any], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - state of other objects, polled
            await asyncio.sleep(0.005)


async def dialled_channel(dispatcher: Dispatcher) -> Any:
    (dialed,) = dispatcher.providers["websocket"].dialed  # type: ignore[attr-defined]
    await until(lambda: dialed.channel is not None, 5)
    return dialed.channel


@contextlib.asynccontextmanager
async def gateway_of(
    heartbeat: float = 20.0,
    max_message_bytes: int = 32 * 1024 * 1024,
    *,
    heartbeat_ms: int = 200,
) -> AsyncIterator[tuple[Dispatcher, tuple[str, int]]]:
    """A gateway pinging its event subscribers every ``heartbeat`` seconds, serving the
    inbound target of plugin ``raw`` (``heartbeat_ms``, ``max_message_bytes``)."""
    plugins = manifest(
        {
            "id": "raw",
            "version": "1.0.0",
            "target": {
                "provider": "websocket",
                "mode": "inbound",
                "token": TOKEN,
                "heartbeat_ms": heartbeat_ms,
                "max_message_bytes": max_message_bytes,
            },
            "defaults": {"timeout_ms": 10_000},
            "methods": {"echo": {}},
        }
    )
    async with Dispatcher(plugins) as dispatcher:
        runner = web.AppRunner(
            create_app(dispatcher, GatewaySettings(heartbeat=heartbeat)),
            handle_signals=False,
            shutdown_timeout=1,
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield dispatcher, runner.addresses[0][:2]
        finally:
            await runner.cleanup()


def inbound_channel(dispatcher: Dispatcher) -> Any:
    """The channel of the plugin connected in, once its fleet lists it: a call made between
    the two finds no instance (``stage`` ``connect``), which a loaded machine made likely."""
    connections = dispatcher.providers["websocket"].inbound.all()  # type: ignore[attr-defined]
    fleet = dispatcher.stats()["fleets"].get("websocket inbound of raw@1.0.0", {})
    return connections[0].channel if connections and fleet.get("instances") else None


# -- the tests ----------------------------------------------------------------------------


async def test_a_dialled_plugin_dropped_for_stalled_writes_lets_go_of_its_socket_at_once() -> None:
    """Before: the drop closed the socket gracefully, and asyncio keeps a closed
    transport's descriptor until its buffer drains, which a plugin that never reads never
    lets it: the socket stayed open (with megabytes buffered) for as long as the plugin
    kept its end. Now the drop aborts the transport once the close frame is handed over."""
    async with (
        raw_plugin_server("127.0.0.2", talking_but_deaf(masked=False)) as plugin,
        dialling(plugin, heartbeat_ms=200) as dispatcher,
    ):
        channel = await dialled_channel(dispatcher)
        inode = tcp_inode(channel.socket.get_extra_info("sockname"), plugin)
        assert inode is not None and held(inode)
        with pytest.raises(TargetUnavailable) as raised:
            await dispatcher.call("raw", "echo", {"blob": BLOB}, timeout=5)
        assert raised.value.details["stage"] == "in_flight"
        assert "stalled" in channel.close_reason, channel.close_reason
        await asyncio.sleep(AT_ONCE)
        assert not held(inode), "the dropped connection's socket is still open"


async def test_a_dialled_plugin_that_goes_silent_lets_go_of_its_socket_once_found() -> None:
    """The plugin reads nothing and sends nothing: the heartbeat (or the stall, whichever
    comes first) finds it. Before: aiohttp closed the transport gracefully and its
    descriptor stayed behind the unsent call. Now the channel's close aborts it."""

    async def silent(send: Callable[[bytes], Awaitable[None]]) -> None:
        await asyncio.Event().wait()

    async with (
        raw_plugin_server("127.0.0.3", silent) as plugin,
        dialling(plugin, heartbeat_ms=300) as dispatcher,
    ):
        channel = await dialled_channel(dispatcher)
        inode = tcp_inode(channel.socket.get_extra_info("sockname"), plugin)
        assert inode is not None
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("raw", "echo", {"blob": BLOB}, timeout=5)
        await until(lambda: channel.closed, 2)
        await asyncio.sleep(AT_ONCE)
        assert not held(inode), "the dropped connection's socket is still open"


async def test_a_plugin_dialled_in_dropped_for_stalled_writes_lets_go_of_its_socket_at_once() -> (
    None
):
    """The same from the gateway's side, a plugin connected in: the stall bound is its
    inbound target's (heartbeat_ms 200 here, 0.3 s), and the drop frees the socket then."""
    async with (
        gateway_of() as (dispatcher, address),
        raw_plugin_client(address, talking_but_deaf(masked=True)) as plugin,
    ):
        await until(lambda: inbound_channel(dispatcher) is not None, 5)
        channel = inbound_channel(dispatcher)
        inode = tcp_inode(address, plugin.getsockname())
        assert inode is not None and held(inode)
        with pytest.raises(TargetUnavailable) as raised:
            await dispatcher.call("raw", "echo", {"blob": BLOB}, timeout=5)
        assert raised.value.details["stage"] == "in_flight", raised.value
        assert "stalled" in channel.close_reason, channel.close_reason
        await asyncio.sleep(AT_ONCE)
        assert not held(inode), "the dropped connection's socket is still open"


async def test_a_dialled_plugin_trickling_a_frame_is_cut_off_within_its_heartbeat() -> None:
    """A plugin starts a 1 MiB message and sends a byte of it every 100 ms: every byte puts
    the heartbeat's ping off, and no receive timeout was set, so before it held the
    reader (and every call on the connection, to its deadline) for the 29 hours the
    message would take. Now a connection that completes no frame within 1.5 heartbeats is
    dropped, its calls failed at once."""
    async with (
        raw_plugin_server("127.0.0.4", trickling(masked=False)) as plugin,
        dialling(plugin, heartbeat_ms=200) as dispatcher,
    ):
        channel = await dialled_channel(dispatcher)
        inode = tcp_inode(channel.socket.get_extra_info("sockname"), plugin)
        assert inode is not None
        started = asyncio.get_running_loop().time()
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("raw", "echo", {}, timeout=5)
        assert asyncio.get_running_loop().time() - started < 2
        assert channel.closed and "frame" in channel.close_reason, channel.close_reason
        await asyncio.sleep(AT_ONCE)
        assert not held(inode), "the dropped connection's socket is still open"


async def test_a_dialled_plugin_sending_fragments_between_pings_is_cut_off() -> None:
    """A plugin sends a message in one-byte fragments with a ping and a pong after each:
    aiohttp takes each for a sign of life, so the socket's receive timeout (which a pong
    restarted) never ended it, and the connection's reader was held for the hours the
    message would take. The read watch counts whole frames only: no frame came, nor an
    answer to its health probe, so it is dropped within three bounds of 0.3 s."""
    async with (
        raw_plugin_server("127.0.0.4", fragmenting(masked=False)) as plugin,
        dialling(plugin, heartbeat_ms=200) as dispatcher,
    ):
        channel = await dialled_channel(dispatcher)
        inode = tcp_inode(channel.socket.get_extra_info("sockname"), plugin)
        assert inode is not None
        await until(lambda: channel.closed, 3)
        assert "no whole frame" in channel.close_reason, channel.close_reason
        await asyncio.sleep(AT_ONCE)
        assert not held(inode), "the dropped connection's socket is still open"


async def test_a_plugin_dialled_in_trickling_a_frame_is_cut_off_within_the_heartbeat() -> None:
    """The same on the gateway's side: the bound follows the inbound target's heartbeat
    (0.2 s here), which the gateway pings the plugins connected in by too."""
    async with (
        gateway_of() as (dispatcher, address),
        raw_plugin_client(address, trickling(masked=True)) as plugin,
    ):
        await until(lambda: inbound_channel(dispatcher) is not None, 5)
        channel = inbound_channel(dispatcher)
        inode = tcp_inode(address, plugin.getsockname())
        assert inode is not None
        await until(lambda: channel.closed, 2)
        assert "frame" in channel.close_reason, channel.close_reason
        await asyncio.sleep(AT_ONCE)
        assert not held(inode), "the dropped connection's socket is still open"


async def test_a_plugin_dialled_in_that_is_idle_but_reads_is_kept_past_the_bound() -> None:
    """The bound does not drop a plugin that is merely idle: one that sends nothing but
    answers the gateway's pings and the health probes of its read watch (docs/protocol.md)
    stays connected for many heartbeats, and its answers are not counted as unknown."""
    async with (
        gateway_of() as (dispatcher, address),
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"http://{address[0]}:{address[1]}/v1/plugins/connect",
            headers={
                PLUGIN_ID_HEADER: "raw",
                PLUGIN_VERSION_HEADER: "1.0.0",
                "Authorization": f"Bearer {TOKEN}",
            },
            heartbeat=None,  # it only answers
        ) as plugin,
    ):
        await plugin.send_bytes(hello_frame("raw", "1.0.0", ["echo"]))

        async def read() -> None:  # answers the gateway's pings as it reads
            async for message in plugin:
                frame = orjson.loads(message.data)
                if frame.get("type") == "health":
                    answer = {"type": "health", "id": frame["id"], "status": "serving"}
                    await plugin.send_bytes(orjson.dumps(answer))

        reading = asyncio.ensure_future(read())
        try:
            await until(lambda: inbound_channel(dispatcher) is not None, 5)
            channel = inbound_channel(dispatcher)
            await asyncio.sleep(1.5)  # seven of its target's heartbeats, five bounds
            assert not channel.closed, channel.close_reason
            assert channel.unknown_ids == 0
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)


@contextlib.asynccontextmanager
async def pinged_plugin(
    address: tuple[str, int], *, pong_after: float | None
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """Plugin ``raw`` dialled in with aiohttp, answering each ping ``pong_after`` seconds
    late (None: never) and every health probe at once."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"http://{address[0]}:{address[1]}/v1/plugins/connect",
            headers={
                PLUGIN_ID_HEADER: "raw",
                PLUGIN_VERSION_HEADER: "1.0.0",
                "Authorization": f"Bearer {TOKEN}",
            },
            heartbeat=None,
            autoping=False,
        ) as plugin,
    ):
        await plugin.send_bytes(hello_frame("raw", "1.0.0", ["echo"]))
        pongs: set[asyncio.Task[None]] = set()

        async def pong_later(payload: bytes, delay: float) -> None:
            await asyncio.sleep(delay)
            await plugin.pong(payload)

        async def read() -> None:
            async for message in plugin:
                if message.type == aiohttp.WSMsgType.PING:
                    if pong_after is not None:
                        pongs.add(asyncio.ensure_future(pong_later(message.data, pong_after)))
                    continue
                frame = orjson.loads(message.data)
                if frame.get("type") == "health":
                    answer = {"type": "health", "id": frame["id"], "status": "serving"}
                    await plugin.send_bytes(orjson.dumps(answer))

        reading = asyncio.ensure_future(read())
        try:
            yield plugin
        finally:
            for task in (reading, *pongs):
                task.cancel()
            await asyncio.gather(reading, *pongs, return_exceptions=True)


async def test_a_plugin_dialled_in_is_pinged_by_its_targets_heartbeat_not_the_gateways() -> None:
    """The gateway pings every 0.2 s, the plugin's target says a heartbeat of 1 s, and
    the plugin's pongs take 0.3 s (a slow link): within the target's bound, which gives a
    pong half a heartbeat. Before: the gateway's heartbeat pinged plugins connected in
    (while the read watch and the write stall followed the target's), and found the
    plugin gone at its first ping, a pong being due within 0.1 s."""
    async with (
        gateway_of(heartbeat=0.2, heartbeat_ms=1_000) as (dispatcher, address),
        pinged_plugin(address, pong_after=0.3),
    ):
        await until(lambda: inbound_channel(dispatcher) is not None, 5)
        channel = inbound_channel(dispatcher)
        await asyncio.sleep(2.5)  # two of the target's pings, twelve of the gateway's
        assert not channel.closed, channel.close_reason


async def test_a_plugin_dialled_in_that_answers_no_ping_is_found_by_its_targets_heartbeat() -> None:
    """The other way round: the target says 0.2 s, the gateway 30 s, and the plugin
    answers its health probes (so its read watch keeps it) but no ping. Before: nothing
    pinged it for 30 s, and a half-open connection that still looked alive would have
    held its calls that long. Now it is found gone within its target's heartbeat."""
    async with (
        gateway_of(heartbeat=30.0, heartbeat_ms=200) as (dispatcher, address),
        pinged_plugin(address, pong_after=None),
    ):
        await until(lambda: inbound_channel(dispatcher) is not None, 5)
        channel = inbound_channel(dispatcher)
        await until(lambda: channel.closed, 2)
        assert "1006" in channel.close_reason, channel.close_reason


async def test_a_plugin_whose_methods_name_several_inbound_targets_gets_the_shortest() -> None:
    """One connection serves every inbound target its plugin's methods name: it is pinged
    by the shortest heartbeat they ask (``connection_heartbeat``, which the provider's
    channel bounds the connection's reads and writes by too)."""
    from dispatcher.identity import Credentials

    def inbound(heartbeat_ms: int) -> dict[str, Any]:
        return {
            "provider": "websocket",
            "mode": "inbound",
            "token": TOKEN,
            "heartbeat_ms": heartbeat_ms,
        }

    plugins = manifest(
        {
            "id": "raw",
            "version": "1.0.0",
            "target": inbound(1_000),
            "methods": {"echo": {}, "slow": {"target": inbound(300)}},
        }
    )
    async with Dispatcher(plugins) as dispatcher:
        admission = await dispatcher.admit_plugin(
            "raw", "1.0.0", Credentials(authorization=f"Bearer {TOKEN}")
        )
    assert len(admission.targets) == 2
    assert admission.heartbeat == 0.3


async def silent(send: Callable[[bytes], Awaitable[None]]) -> None:
    await asyncio.Event().wait()


async def test_a_plugin_dialled_in_whose_hello_lies_is_let_go_at_once() -> None:
    """Admitted as version 1.0.0, its hello says 2.0.0, and it then neither reads nor
    closes. Before: the gateway closed gracefully, waiting 10 s (aiohttp's close
    timeout) for the plugin's close frame, holding the socket and the handler all along.
    Now the refusal is handed over and the socket aborted."""
    async with (
        gateway_of() as (_, address),
        raw_plugin_client(address, silent, version="2.0.0") as plugin,
    ):
        inode = tcp_inode(address, plugin.getsockname())
        assert inode is not None
        await until(lambda: not held(inode), 2)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(2):  # the refusal reached the plugin before the end
            received = await loop.sock_recv(plugin, 4096)
        assert received[:2] == bytes([0x88, len(received) - 2])  # one close frame
        assert int.from_bytes(received[2:4], "big") == 4403, received


async def test_a_dialled_plugin_whose_hello_lies_is_let_go_at_once() -> None:
    """The plugin at the URL says it is another plugin, then neither reads nor closes.
    Before: the dialer closed gracefully, waiting a heartbeat (10 s here) for the
    plugin's close frame. Now the socket is aborted once the close frame is handed over."""
    async with (
        # Its hello comes 0.3 s after the upgrade: time to find the dispatcher's socket.
        raw_plugin_server("127.0.0.5", silent, plugin_id="impostor", hello_after=0.3) as plugin,
        dialling(plugin, heartbeat_ms=10_000) as dispatcher,
    ):
        (dialed,) = dispatcher.providers["websocket"].dialed  # type: ignore[attr-defined]
        await until(lambda: tcp_inodes_to(plugin), 5)
        dialled = tcp_inodes_to(plugin)
        await until(lambda: not any(held(inode) for inode in dialled), 2)
        # Said once the dial has ended, a few steps of the loop after the socket went: a
        # busy machine's poll above can come in between.
        with contextlib.suppress(TimeoutError):
            await until(lambda: "impostor" in dialed.last_error, 2)
        assert "impostor" in dialed.last_error, dialed.last_error


async def test_closing_three_dialled_plugins_that_never_answer_the_close_waits_for_none() -> None:
    """Three dialled plugins that neither read nor answer the close frame, with a 10 s
    heartbeat (aiohttp's wait for a close frame): the provider keeps the one detach queue
    of the default because no detach waits on its plugin (its readers are cancelled
    first, and the close aborts the socket). A detach that waited would cost 10 s each,
    one after another."""
    hosts = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    async with contextlib.AsyncExitStack() as stack:
        plugins = [
            await stack.enter_async_context(raw_plugin_server(host, silent, plugin_id=f"raw-{n}"))
            for n, host in enumerate(hosts)
        ]
        entries = [dialled(f"raw-{n}", each, 10_000) for n, each in enumerate(plugins)]
        dispatcher = Dispatcher(manifest(*entries))
        await dispatcher.start()
        try:
            dialed = dispatcher.providers["websocket"].dialed  # type: ignore[attr-defined]
            await until(lambda: all(each.channel is not None for each in dialed), 5)
        finally:
            started = time.monotonic()
            await dispatcher.aclose()
        elapsed = time.monotonic() - started
        assert elapsed < 2.0, f"aclose took {elapsed:.2f} s"
        for each in plugins:
            assert not any(held(inode) for inode in tcp_inodes_to(each))


async def test_a_plugin_dialled_in_is_held_to_its_targets_max_message_bytes() -> None:
    """An inbound target's max_message_bytes (12 MiB here) bounds what its plugins send,
    as a dialled target's does. Before: the gateway read a plugin's messages up to 8 MiB
    whatever the target said, so a 10 MiB answer closed the connection (1009) and, with
    a smaller limit, a message over it was taken."""
    limit = 12 * 1024 * 1024
    async with (
        gateway_of(max_message_bytes=limit) as (dispatcher, address),
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"http://{address[0]}:{address[1]}/v1/plugins/connect",
            headers={
                PLUGIN_ID_HEADER: "raw",
                PLUGIN_VERSION_HEADER: "1.0.0",
                "Authorization": f"Bearer {TOKEN}",
            },
        ) as plugin,
    ):
        await plugin.send_bytes(hello_frame("raw", "1.0.0", ["echo"]))

        async def answer() -> None:
            async for message in plugin:
                frame = orjson.loads(message.data)
                if frame["type"] == "call":
                    result = {"ok": True, "result": "a" * (10 * 1024 * 1024)}
                    answer = {"type": "response", "id": frame["id"], "response": result}
                    await plugin.send_bytes(orjson.dumps(answer))

        answering = asyncio.ensure_future(answer())
        try:
            await until(lambda: inbound_channel(dispatcher) is not None, 5)
            assert len(await dispatcher.call("raw", "echo", {}, timeout=5)) == 10 * 1024 * 1024
            channel = inbound_channel(dispatcher)
            event = {"type": "event", "event": "big", "data": "b" * limit}
            with contextlib.suppress(ConnectionError):  # refused on its header: cut off
                await plugin.send_bytes(orjson.dumps(event))
            await until(lambda: channel.closed, 5)
            assert "exceeds limit" in channel.close_reason, channel.close_reason
        finally:
            answering.cancel()
            await asyncio.gather(answering, return_exceptions=True)


async def test_a_plugin_dialled_in_is_not_held_to_what_its_hello_padded() -> None:
    """A hello within the message limit (6 MiB here) that lists a million methods and
    carries a million empty arrays beside them: decoded, some 100 MB of objects. Before:
    the host kept the hello whole for as long as the connection lasted (in the
    connection's record and the task serving it), so a few such plugins held gigabytes.
    Now it keeps the fields it reads, its method lists cut just past what it believes."""
    padded = orjson.loads(hello_frame("raw", "1.0.0", ["echo"]))
    padded["methods"] = ["m"] * 1_000_000
    padded["padding"] = [[]] * 1_000_000
    tracemalloc.start()
    try:
        async with (
            gateway_of() as (dispatcher, address),
            aiohttp.ClientSession() as session,
            session.ws_connect(
                f"http://{address[0]}:{address[1]}/v1/plugins/connect",
                headers={
                    PLUGIN_ID_HEADER: "raw",
                    PLUGIN_VERSION_HEADER: "1.0.0",
                    "Authorization": f"Bearer {TOKEN}",
                },
            ) as plugin,
        ):
            await plugin.send_bytes(orjson.dumps(padded))
            # What is held is the test, not how soon: decoding a million entries under
            # tracemalloc took 9 s alone on a loaded machine, past the 10 s this waited.
            await until(lambda: inbound_channel(dispatcher) is not None, 60)
            gc.collect()
            held_now, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held_now < 20 * 1024 * 1024, f"{held_now / 2**20:.0f} MiB held"


# -- on uvloop, the loop `dispatcher serve` runs --------------------------------------------


@pytest.mark.parametrize(
    "test",
    [
        test_a_dialled_plugin_dropped_for_stalled_writes_lets_go_of_its_socket_at_once,
        test_a_plugin_dialled_in_dropped_for_stalled_writes_lets_go_of_its_socket_at_once,
        test_a_plugin_dialled_in_trickling_a_frame_is_cut_off_within_the_heartbeat,
        test_a_dialled_plugin_sending_fragments_between_pings_is_cut_off,
        test_a_plugin_dialled_in_whose_hello_lies_is_let_go_at_once,
    ],
    ids=lambda test: test.__name__.removeprefix("test_"),
)
def test_on_uvloop(test: Any) -> None:
    """uvloop's transports are not ``asyncio.Transport``s: before, the abort looked for
    one, found none, and left every dropped socket open as before (these four failed)."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test())


async def test_a_channel_closed_before_it_reads_leaves_no_read_watch_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A channel closed before its reader ran (a dial cancelled after the hello) then ran
    ``run``, which armed the read watch: ``_closed`` runs once, so nothing stopped it, and
    it probed and 'dropped' a connection long closed, with a warning."""
    from providers.websocket.channel import Channel

    async def accept(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/ws", accept)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://{host}:{port}/ws") as socket_,
        ):
            channel = Channel(
                socket_,
                "test plugin",
                heartbeat=0.1,
                max_in_flight=8,
                max_message_bytes=1 << 20,
                max_events_per_second=100,
                sink=None,
            )
            await channel.close()
            with caplog.at_level(logging.WARNING, "dispatcher.providers.websocket"):
                await channel.run()
                await asyncio.sleep(0.5)  # three bounds of 0.15 s
            assert not channel._read_watch.watching
            assert not [r for r in caplog.records if "dropping" in r.getMessage()]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def closing_first(
    *, reads: bool
) -> AsyncIterator[tuple[str, asyncio.Event, asyncio.Future[None], list[bytes]]]:
    """A raw WebSocket peer at 127.0.0.6 with a small receive buffer that reads nothing
    until told (the event), then sends its close frame (1000) first. ``reads``: it then
    reads everything sent to it into the list, to the end (the future is done then); else
    it reads nothing ever."""
    loop = asyncio.get_running_loop()
    listener = small_receive_buffer()
    listener.bind(("127.0.0.6", 0))
    listener.listen()
    told = asyncio.Event()
    received: list[bytes] = []
    accepted: list[socket.socket] = []

    async def serve() -> None:
        conn, _ = await loop.sock_accept(listener)
        accepted.append(conn)
        request = await read_head(conn)
        key = re.search(rb"(?i)sec-websocket-key:\s*(\S+)", request)
        assert key is not None
        accept = base64.b64encode(hashlib.sha1(key.group(1) + _GUID).digest())
        await loop.sock_sendall(
            conn,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n",
        )
        await told.wait()
        await loop.sock_sendall(conn, ws_frame((1000).to_bytes(2, "big"), masked=False, opcode=8))
        if not reads:
            await asyncio.Event().wait()
        while chunk := await loop.sock_recv(conn, 1 << 20):
            received.append(chunk)

    serving = asyncio.ensure_future(serve())
    host, port = listener.getsockname()
    try:
        yield f"http://{host}:{port}/", told, serving, received
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        for each in (listener, *accepted):
            each.close()


@contextlib.asynccontextmanager
async def channel_filled_and_closed_first(
    url: str, told: asyncio.Event
) -> AsyncIterator[tuple[Any, int]]:
    """A channel to the peer at ``url`` with a 16 MiB event stuck in its buffers when the
    peer's close frame arrives, its reader ended by that close; and its socket's inode."""
    from providers.websocket.channel import Channel

    async with aiohttp.ClientSession() as session, session.ws_connect(url) as socket_:
        channel = Channel(
            socket_,
            "test plugin",
            heartbeat=1.0,  # a grace of 1.5 s; no write stalls that long here
            max_in_flight=8,
            max_message_bytes=64 << 20,
            max_events_per_second=100,
            sink=None,
        )
        inode = tcp_inode(socket_.get_extra_info("sockname"), socket_.get_extra_info("peername"))
        assert inode is not None
        reader = asyncio.ensure_future(channel.run())
        event = orjson.dumps({"type": "event", "event": "big", "data": BLOB})
        sending = asyncio.ensure_future(channel.send_event(event))
        await until(lambda: channel._writer.draining, 2)  # the peer's buffers are full
        told.set()
        await asyncio.wait_for(reader, 2)  # the peer's close frame ended it
        try:
            yield channel, inode
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)


async def test_a_channel_closed_after_its_plugin_closed_first_leaves_nothing_running() -> None:
    """The plugin closes first with data still buffered for it and reads nothing more.
    Before: the channel's close returned at once and left a loop timer behind, not the
    channel's, holding the socket (and 16 MiB) to abort it 1.5 heartbeats later, however
    long ago the channel was closed. Now the channel owns that grace: its close ends it,
    and once the close returns the socket is let go and nothing of the channel runs."""
    async with (
        closing_first(reads=False) as (url, told, _, _),
        channel_filled_and_closed_first(url, told) as (channel, inode),
    ):
        assert held(inode)
        started = asyncio.get_running_loop().time()
        await channel.close()
        assert asyncio.get_running_loop().time() - started < 1.5 + 0.5  # its grace at most
        assert not held(inode), "the closed channel's socket is still open"


async def test_a_plugin_that_closed_first_and_reads_gets_the_rest_and_the_close_frame() -> None:
    """The grace is kept: a plugin that closed first and then reads takes everything
    buffered for it and the channel's close frame after it, not an abort, and the close
    returns once it has (not after the whole grace)."""
    async with (
        closing_first(reads=True) as (url, told, read_to_the_end, received),
        channel_filled_and_closed_first(url, told) as (channel, _),
    ):
        started = asyncio.get_running_loop().time()
        await channel.close()
        assert asyncio.get_running_loop().time() - started < 1.0
        await asyncio.wait_for(read_to_the_end, 2)
        data = b"".join(received)
        assert len(data) > len(BLOB)
        assert data[-8:-6] == bytes([0x88, 0x82]), data[-8:]  # a masked close frame, code only


async def test_a_tls_connection_closed_twice_is_let_go_without_an_error() -> None:
    """asyncio's TLS transport closed a second time forgets its TLS protocol, and asking it
    what it still holds raises ``AttributeError`` (CPython 3.11, the version here).
    aiohttp closes it on the dispatcher's close and again as the plugin's side goes, which
    a plugin that answers a close at once does within that close: the gateway's closing
    task failed with a traceback each time such a plugin left over ``wss://``
    (tests/conformance/test_connect_over_wss.py). A transport in that state holds nothing:
    the grace ends at once, without an error."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.Future()
    server = await asyncio.start_server(
        lambda _, writer: accepted.set_result(writer), "127.0.0.1", 0, ssl=server_context
    )
    port = server.sockets[0].getsockname()[1]
    try:
        _, client = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context, server_hostname="localhost"
        )
        transport = cast(asyncio.Transport, (await asyncio.wait_for(accepted, 10)).transport)
        transport.close()
        transport.close()  # as aiohttp's connection_lost does after its WebSocket's close
        async with asyncio.timeout(1):
            await let_go(transport, within=5.0)
        client.close()
    finally:
        server.close()
