"""Connections that never upgrade cost every SDK's WebSocket server little and not for long
(docs/protocol.md, "WebSocket binding", dial mode).

``serve --websocket`` held 1,000 sessions at most, but a connection that asked for no
upgrade was not counted: 1,200 idle sockets, or 1,200 heads never finished, held 1,200
descriptors (and goroutines, tasks, buffers) in every SDK, for 10 s (Go, Rust), a minute
(TypeScript) or an hour (Python). Now at most ``MAX_WAITING`` (100) connections wait for
their head at once, the oldest closed to make room for a new one, so a real host dialling
during the flood is still served; and a head must be complete within 10 s of the
connection's opening, as ``dispatcher-plugin serve``'s ``--header-timeout``.

The example plugin of each SDK, a token set, raw sockets as the flood, a raw upgrade as
the real host; the plugin's descriptors read from ``/proc``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conformance.test_websocket_token import SERVING_WEBSOCKET, _served
from tests.side_by_side import SideBySide

pytestmark = [
    pytest.mark.parametrize("language", SERVING_WEBSOCKET),
    pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/PID/fd"),
]

FLOOD = 1200
#: Connections waiting for their head that a server holds at once (every SDK's).
MAX_WAITING = 100
#: Descriptors a server may open past its count before the flood: MAX_WAITING, the real
#: host's, and whatever a runtime opens on its own meanwhile (Node's, Go's pollers).
SLACK = MAX_WAITING + 60
HEAD_DEADLINE = 10.0
#: The first line of a head, never finished: what a slowloris peer sends.
UNFINISHED_HEAD = b"GET / HTTP/1.1\r\nHost: plugin\r\nX-Slow: "


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _open(address: str, count: int, first_bytes: bytes) -> list[socket.socket]:
    """``count`` connections to ``address``, each sent ``first_bytes`` (maybe none)."""
    host, port = address.rsplit(":", 1)
    opened = []
    try:
        for _ in range(count):
            each = socket.create_connection((host, int(port)), timeout=10)
            if first_bytes:
                each.sendall(first_bytes)
            opened.append(each)
    except BaseException:
        for each in opened:
            each.close()
        raise
    return opened


async def _real_host_served(url: str, token: str) -> None:
    """A dispatcher's upgrade with the token: upgraded, and the plugin's hello arrives."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers={"Authorization": f"Bearer {token}"}) as socket_,
    ):
        message = await asyncio.wait_for(socket_.receive(), 10)
        assert orjson.loads(message.data)["type"] == "hello", message


@pytest.mark.parametrize("first_bytes", [b"", UNFINISHED_HEAD], ids=["idle", "slow-head"])
async def test_a_flood_of_connections_that_never_upgrade_holds_few_descriptors(
    language: str, first_bytes: bytes
) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    async with _served(language, LINCHKIT_PLUGIN_TOKEN=token) as (service, url):
        pid = service.process.pid
        await _real_host_served(url, token)  # the runtime warmed up: its own descriptors open
        before = _descriptors(pid)
        flood = await asyncio.to_thread(_open, service.address, FLOOD, first_bytes)
        try:
            # Dialled after the whole flood: served, the flood all accepted by then.
            await _real_host_served(url, token)
            held = _descriptors(pid) - before
            assert held <= SLACK, (
                f"{language} holds {held} more descriptors with {FLOOD} connections that"
                f" never upgraded (at most {SLACK} expected)"
            )
        finally:
            for each in flood:
                each.close()


async def test_a_head_not_finished_in_time_is_closed(
    side_by_side: SideBySide, request: pytest.FixtureRequest, language: str
) -> None:
    """An idle connection and an unfinished head are closed within the head deadline. The
    SDKs wait out their deadlines side by side, each plugin with connections of its own."""
    await side_by_side.run_async(request, _closed_at_the_head_deadline)


async def _closed_at_the_head_deadline(language: str) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    async with _served(language, LINCHKIT_PLUGIN_TOKEN=token) as (service, url):
        idle, slow = await asyncio.to_thread(_open, service.address, 2, b"")
        slow.sendall(UNFINISHED_HEAD)
        try:
            closed_after = await asyncio.gather(
                asyncio.to_thread(_closed_after, idle, HEAD_DEADLINE + 10),
                asyncio.to_thread(_closed_after, slow, HEAD_DEADLINE + 10),
            )
            assert None not in closed_after, (language, closed_after)
            # Not before the deadline either: a host whose head is slow to come (a busy
            # machine, a long TLS hop) has all of it. Each connection opened a moment
            # before its clock here started: two seconds of margin, for a busy machine.
            early = [each for each in closed_after if each is not None and each < HEAD_DEADLINE - 2]
            assert early == [], (language, closed_after)
            await _real_host_served(url, token)
        finally:
            idle.close()
            slow.close()


def _closed_after(connection: socket.socket, seconds: float) -> float | None:
    """The seconds until the server closes ``connection`` (whatever it answers first: a
    408 before closing is fine), or None if it did not within ``seconds``."""
    started = time.monotonic()
    deadline = started + seconds
    while (left := deadline - time.monotonic()) > 0:
        connection.settimeout(left)
        try:
            if not connection.recv(4096):
                return time.monotonic() - started
        except TimeoutError:
            return None
        except ConnectionResetError:
            return time.monotonic() - started
    return None
