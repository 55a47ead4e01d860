"""Bearer-token authentication of every SDK's WebSocket server (docs/protocol.md,
"WebSocket binding", dial mode), as ``test_token.py`` holds every SDK's gRPC service.

The example plugin served with ``serve --websocket`` and ``LINCHKIT_PLUGIN_TOKEN`` or
``LINCHKIT_PLUGIN_TOKEN_FILE``: an upgrade without ``Authorization: Bearer <token>`` (none,
another token, another scheme, the token cut short), or with more than one ``Authorization``
header (another token first or after it, the token twice), is refused 401
before it upgrades, and neither what the plugin answers nor what it writes on stderr holds
either token; a ``provider: websocket`` target with another ``token`` fails its calls
``TargetUnavailable``, one with the token is served (calls, streams, events). Without a
token the server serves anyone and warns on stderr, naming the variables (the Python
executable's ``serve --websocket`` said nothing until 2026-12-05). Both variables at once
are refused at start.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from dispatcher import Dispatcher, TargetUnavailable, parse_manifest
from tests.conformance.conftest import (
    START_TIMEOUT,
    WEBSOCKET_MODES,
    _start_websocket_service,
    executable,
)
from tests.conformance.test_token import WARNING, Service, _environment
from tests.conftest import ROOT

SERVING_WEBSOCKET = sorted(
    language for language, modes in WEBSOCKET_MODES.items() if "websocket" in modes
)
pytestmark = pytest.mark.parametrize("language", SERVING_WEBSOCKET)

#: How long a call waits for a dialled plugin that refuses every upgrade.
REFUSED_WAIT_MS = 1500


@asynccontextmanager
async def _served(language: str, **token: str) -> AsyncIterator[tuple[Service, str]]:
    """``serve --websocket`` with ``token`` (and no other token variable): the service, its
    stderr read along, and its ``ws://`` URL."""
    process, address, _ = await _start_websocket_service(
        executable(language), stderr=asyncio.subprocess.PIPE, env=_environment(**token)
    )
    service = Service(process, address)
    try:
        yield service, f"ws://{address}/"
    finally:
        await service.stop()


def _dispatcher(url: str, token: str | None, **target: Any) -> Dispatcher:
    websocket: dict[str, Any] = {"provider": "websocket", "url": url, **target}
    if token is not None:
        websocket["token"] = token
    manifest = parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "example",
                    "version": "1.0.0",
                    "target": websocket,
                    "defaults": {"timeout_ms": 10_000},
                    "methods": {"echo": {}, "count": {}},
                }
            ],
        },
        base_dir=ROOT,
    )
    return Dispatcher(manifest)


async def _upgrade_answer(url: str, authorization: list[str]) -> tuple[int, str]:
    """An upgrade request sent with each of ``authorization`` as a header: the status and
    the body of the answer (a refusal's; a 101 is not read on)."""
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
        *(("Authorization", value) for value in authorization),
    ]
    http_url = "http" + url.removeprefix("ws")
    async with (
        aiohttp.ClientSession() as session,
        session.get(http_url, headers=aiohttp.typedefs.CIMultiDict(headers)) as answer,
    ):
        body = "" if answer.status == 101 else await answer.text()
        return answer.status, body


@pytest.mark.parametrize("source", ["env", "file"])
async def test_a_token_guards_the_upgrade(language: str, source: str, tmp_path: Path) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    wrong = "tok-" + secrets.token_urlsafe(24)
    if source == "file":
        token_file = tmp_path / "token"
        token_file.write_text(f"  {token}\n")
        environment = {"LINCHKIT_PLUGIN_TOKEN_FILE": str(token_file)}
    else:
        environment = {"LINCHKIT_PLUGIN_TOKEN": token}

    async with _served(language, **environment) as (service, url):
        for authorization in (
            [],
            [f"Bearer {wrong}"],
            [wrong],
            [f"Basic {token}"],
            [f"Bearer {token[:-1]}"],
            [f"Bearer {token}x"],
            [f"Bearer {wrong}", f"Bearer {token}"],
            # More than one is refused whatever the others say, as over gRPC: the first
            # right and another after it were let in by Python and TypeScript.
            [f"Bearer {token}", f"Bearer {wrong}"],
            [f"Bearer {token}", f"Bearer {token}"],
        ):
            status, body = await _upgrade_answer(url, authorization)
            assert status == 401, (authorization, status, body)
            assert token not in body and wrong not in body, body
        # The scheme in any case, as over gRPC and HTTP.
        assert (await _upgrade_answer(url, [f"bearer {token}"]))[0] == 101

        # A target with another token is never served: its calls fail as never sent.
        async with _dispatcher(url, wrong, connect_timeout_ms=REFUSED_WAIT_MS) as dispatcher:
            with pytest.raises(TargetUnavailable) as caught:
                await dispatcher.call("example", "echo", {"x": 1})
            assert wrong not in str(caught.value) and token not in str(caught.value)
        # With the token: calls, streams and events.
        async with _dispatcher(url, token, connect_timeout_ms=30_000) as dispatcher:
            pongs: asyncio.Queue[Any] = asyncio.Queue()
            dispatcher.on("example", "pong", lambda _event, data: pongs.put_nowait(data))
            assert await dispatcher.call("example", "echo", {"x": 1}) == {"x": 1}
            chunks = [c async for c in dispatcher.stream("example", "count", {"n": 2})]
            assert chunks == [{"i": 0}, {"i": 1}]
            await dispatcher.publish("example", "ping", {"seq": 1})
            assert await asyncio.wait_for(pongs.get(), 10) == {"seq": 1}

        stderr = await service.stop()
    assert token not in stderr
    assert wrong not in stderr
    assert WARNING not in stderr, stderr


#: Requests a peer without the token may send, each answered 401 and nothing else: no 426
#: for a plain GET (TypeScript's, until 2026-12-06), no 405 for another method (Python's
#: and Rust's), no word on the upgrade's headers.
UNAUTHENTICATED = {
    "plain GET": b"GET / HTTP/1.1\r\nHost: plugin\r\n\r\n",
    "POST": b"POST / HTTP/1.1\r\nHost: plugin\r\nContent-Length: 2\r\n\r\n{}",
    # Answered by its head: Java's server read a body whole first, and answered one of
    # 100 KB nothing at all until 2026-12-06.
    "POST of 100 KB": (
        b"POST / HTTP/1.1\r\nHost: plugin\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000
    ),
    "old version": (
        b"GET / HTTP/1.1\r\nHost: plugin\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
    ),
    "no key": (
        b"GET / HTTP/1.1\r\nHost: plugin\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    ),
}


async def test_a_peer_without_the_token_learns_nothing_else(language: str) -> None:
    """Whatever it sends, a peer without the token is answered 401 in the ``unauthorized``
    envelope, and the connection ends with the answer (kept alive, it waited for another
    head: TypeScript's and Python's did)."""
    token = "tok-" + secrets.token_urlsafe(24)
    async with _served(language, LINCHKIT_PLUGIN_TOKEN=token) as (service, _):
        host, port = service.address.rsplit(":", 1)
        for what, request in UNAUTHENTICATED.items():
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(request)
                async with asyncio.timeout(10):  # the server closes it: EOF
                    answer = await reader.read()
            finally:
                writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            status_line, *headers = head.decode("latin-1").split("\r\n")
            assert status_line.split(" ")[1] == "401", (what, answer)
            names = {line.split(":", 1)[0].strip().lower(): line for line in headers}
            assert "bearer" in names.get("www-authenticate", "").lower(), (what, answer)
            error = orjson.loads(body)["error"]
            assert error["type"] == "unauthorized", (what, answer)


async def test_without_a_token_the_server_serves_anyone_and_warns(language: str) -> None:
    async with _served(language) as (service, url):
        async with _dispatcher(url, None, connect_timeout_ms=30_000) as dispatcher:
            assert await dispatcher.call("example", "echo", [1]) == [1]
        stderr = await service.stop()
    # A warning by its level (WARN, level=WARN) or its words (Python's "Warning:").
    assert "warn" in stderr.lower() and "LINCHKIT_PLUGIN_TOKEN" in stderr, stderr


async def test_a_dispatcher_offering_deflate_with_the_token_is_served(language: str) -> None:
    """``compress: true`` and ``token`` together: the token is checked before the
    extension is agreed, and the deflated connection carries the calls."""
    token = "tok-" + secrets.token_urlsafe(24)
    async with (
        _served(language, LINCHKIT_PLUGIN_TOKEN=token) as (_, url),
        _dispatcher(url, token, connect_timeout_ms=30_000, compress=True) as dispatcher,
    ):
        text = "deflate me " * 10_000
        assert await dispatcher.call("example", "echo", text) == text
        provider: Any = dispatcher.providers["websocket"]
        (dialled,) = provider.dialed
        assert dialled.channel.socket.compress == 15


async def test_both_token_sources_are_refused(language: str, tmp_path: Path) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    token_file = tmp_path / "token"
    token_file.write_text(token)
    environment = _environment(
        LINCHKIT_PLUGIN_TOKEN=token, LINCHKIT_PLUGIN_TOKEN_FILE=str(token_file)
    )
    process = await asyncio.create_subprocess_exec(
        str(executable(language)), "serve", "--websocket", "--address", "127.0.0.1:0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=environment,
    )  # fmt: skip
    async with asyncio.timeout(START_TIMEOUT):
        stdout, stderr = await process.communicate()
    assert process.returncode != 0
    assert stdout == b"", "it served with two tokens"
    text = stderr.decode(errors="replace")
    assert "LINCHKIT_PLUGIN_TOKEN" in text and "both" in text, text
    assert token not in text
