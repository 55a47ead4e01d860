"""What the gateway's tests share: a dispatcher and a gateway on 127.0.0.1 port 0, a tiny
authenticator (a test double of the seam the real authenticators plug into), raw sockets,
and a stand-in for the gateway that closes each plugin connection after its hello."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from click.testing import Result

from dispatcher import Dispatcher, Forbidden, Unauthorized
from dispatcher.gateway import GatewayServer, GatewaySettings
from dispatcher.identity import Authenticator, Credentials, Principal
from tests.conftest import LOCAL_TARGET, ROOT, manifest

SECRET_TOKEN = "s3cr3t-t0ken-that-must-never-leak"

SAY_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 1000}},
    "required": ["text"],
    "additionalProperties": False,
}


def echo_entry(**methods: Any) -> dict[str, Any]:
    return {
        "id": "echo",
        "version": "1.0.0",
        "config": {"greeting": "via gateway"},
        "target": LOCAL_TARGET,
        "methods": methods
        or {
            "say": {"params_schema": SAY_SCHEMA, "description": "Echo text back"},
            "sleep": {
                "params_schema": {
                    "type": "object",
                    "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": 0.05}},
                    "required": ["seconds"],
                    "additionalProperties": False,
                }
            },
            "withdraw": {
                "params_schema": {
                    "type": "object",
                    "properties": {"amount": {"type": "integer"}},
                    "required": ["amount"],
                    "additionalProperties": False,
                }
            },
        },
    }


def eventful_entry() -> dict[str, Any]:
    return {
        "id": "events",
        "version": "1.0.0",
        "target": {"provider": "local", "entrypoint": "eventful_plugin:EventfulPlugin"},
        # Bounded: the fuzz tests call every method with what its schema allows, and an
        # in-process plugin asked for 10**18 events would hold the loop for good.
        "methods": {
            "burst": {
                "params_schema": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 50},
                        "count": {"type": "integer", "minimum": 0, "maximum": 5000},
                        "size": {"type": "integer", "minimum": 0, "maximum": 65_536},
                    },
                    "required": ["name", "count"],
                    "additionalProperties": False,
                }
            }
        },
    }


def example_entry() -> dict[str, Any]:
    """The Python example plugin as a real subprocess plugin: it answers host event ``ping``
    with plugin event ``pong`` (the local provider cannot take host events)."""
    command = [sys.executable, str(ROOT / "sdk" / "python" / "examples" / "example_plugin.py")]
    return {
        "id": "example",
        "version": "1.0.0",
        "target": {"provider": "subprocess", "command": command},
        "methods": {"echo": {}, "emit": {}},
    }


@dataclass
class OneToken:
    """Accepts one bearer token (or API key); a principal named by the token's holder.
    A certificate subject found in ``subjects`` is accepted too; ``forbidden`` ids get
    Forbidden. Records every credentials object it was shown."""

    token: str = SECRET_TOKEN
    forbidden: frozenset[str] = frozenset()
    subjects: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.seen: list[Credentials] = []

    async def authenticate(self, credentials: Credentials) -> Principal:
        self.seen.append(credentials)
        if credentials.certificate_subject in self.subjects:
            return Principal(str(credentials.certificate_subject), proven_by="mtls")
        presented = credentials.api_key
        if credentials.authorization and credentials.authorization.startswith("Bearer "):
            presented = credentials.authorization.removeprefix("Bearer ")
        if presented is None or not hmac.compare_digest(presented, self.token):
            raise Unauthorized("a valid bearer token or API key is required")
        if "alice" in self.forbidden:
            raise Forbidden("alice may not call this gateway")
        return Principal("alice", frozenset({"reader"}), proven_by="api_key")


@contextlib.asynccontextmanager
async def running_gateway(
    *entries: dict[str, Any],
    settings: GatewaySettings | None = None,
    authenticator: Authenticator | None = None,
) -> AsyncIterator[tuple[Dispatcher, GatewayServer]]:
    entries = entries or (echo_entry(), eventful_entry())
    settings = settings or GatewaySettings(port=0, header_timeout=2.0, body_timeout=2.0)
    async with (
        Dispatcher(manifest(*entries)) as dispatcher,
        GatewayServer(dispatcher, settings, authenticator=authenticator) as server,
    ):
        yield dispatcher, server


@contextlib.asynccontextmanager
async def raw_connection(
    url: str,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_answer(reader: asyncio.StreamReader, timeout: float = 10.0) -> tuple[int, bytes]:
    """Status and everything the server sent until it closed (or ``timeout``)."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        rest = b""
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            None,
        )
        if length is not None:
            rest = await reader.readexactly(length)
        return status, head + rest


def failed_in_one_line(result: Result, code: int = 1) -> str:
    """stderr of a run that ended with ``code`` and a message, not an exception."""
    assert result.exit_code == code, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    if code == 1:
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    return result.stderr


def no_control_characters(text: str) -> bool:
    return all(character.isprintable() or character == "\n" for character in text)


@contextlib.asynccontextmanager
async def answering_every_request(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """An aiohttp server on loopback that answers every request, any method and path, with
    ``handler`` (a gateway that lies, in the CLI's tests); yields its URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def closing_gateway(code: int, reason: str) -> AsyncIterator[tuple[str, list[Any]]]:
    """A WebSocket server on loopback that upgrades every dial, reads its hello and closes
    the connection with ``code`` and ``reason``, as the gateway answers a hello it does not
    take. Yields its URL and the hellos read, one per upgrade."""
    hellos: list[Any] = []

    async def connect(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        hello = await ws.receive(timeout=10)
        hellos.append(orjson.loads(hello.data))
        await ws.close(code=code, message=reason.encode())
        return ws

    app = web.Application()
    app.router.add_get("/v1/plugins/connect", connect)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"ws://127.0.0.1:{runner.addresses[0][1]}/v1/plugins/connect", hellos
    finally:
        await runner.cleanup()
