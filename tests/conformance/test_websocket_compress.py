"""``compress`` on a ``websocket`` target, against each SDK's real plugin process and the real
dispatcher, in both WebSocket modes (docs/protocol.md, "WebSocket binding", "compress").

permessage-deflate (RFC 7692) is offered by the side that dials and accepted, or not, by
the side that serves: dial mode, the dispatcher offers it when the target says
``compress: true`` and the plugin's server must accept; inbound, the plugin's ``connect``
offers it on every dial and the gateway accepts it when the target says so. Each case
echoes 1 MB of repetitive JSON through a TCP proxy that counts the bytes each way, and
reads what the dispatcher's side of the handshake agreed (``compress``, the window bits):
deflated, both ways carry a small fraction of the payload; not, both carry all of it.

Before, the Python and Go SDKs' ``connect`` never offered it and the TypeScript SDK's
server never accepted it: ``compress: true`` deflated nothing there. The Java SDK speaks
both WebSocket modes since 2026-12-06 (``WEBSOCKET_MODES``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from dispatcher import Dispatcher
from tests.conformance.conftest import (
    INBOUND_TOKEN,
    LANGUAGES,
    START_TIMEOUT,
    WEBSOCKET_MODES,
    _dialling_in,
    _manifest,
    _start_websocket_service,
    _stop_service,
    executable,
)
from tests.fault_proxy import FaultProxy

CASES = [(language, mode) for language in LANGUAGES for mode in WEBSOCKET_MODES.get(language, ())]
#: 1 MB of JSON that deflates to a few KB.
PAYLOAD = {"rows": [{"name": "row", "value": n % 10} for n in range(40_000)]}
PAYLOAD_BYTES = len(orjson.dumps(PAYLOAD))


@contextlib.asynccontextmanager
async def linked(
    language: str, mode: str, *, compress: bool
) -> AsyncIterator[tuple[Dispatcher, FaultProxy]]:
    """The example plugin of ``language`` and a dispatcher whose target says ``compress``,
    connected in ``mode`` through a proxy counting the bytes."""
    path = executable(language)
    proxies: list[FaultProxy] = []

    async def relay(port: int) -> int:
        proxy = FaultProxy("127.0.0.1", port)
        proxies.append(proxy)
        return await proxy.start()

    service = None
    try:
        if mode == "websocket":
            service, address, target = await _start_websocket_service(path)
            host, port = address.rsplit(":", 1)
            target["url"] = f"ws://{host}:{await relay(int(port))}/"
        else:
            target = {"provider": "websocket", "mode": "inbound", "token": INBOUND_TOKEN}
        async with Dispatcher(_manifest({**target, "compress": compress})) as dispatcher:
            if mode == "websocket":
                yield dispatcher, proxies[0]
            else:
                async with _dialling_in(path, dispatcher, relay=relay):
                    yield dispatcher, proxies[0]
    finally:
        if service is not None:
            await _stop_service(service)
        for proxy in proxies:
            await proxy.aclose()


def negotiated_window(dispatcher: Dispatcher, mode: str) -> int:
    """The permessage-deflate window the dispatcher's side of the one connection agreed
    to (aiohttp's ``compress``: 0 when none was)."""
    provider: Any = dispatcher.providers["websocket"]
    if mode == "websocket":
        (dialled,) = provider.dialed
        channel = dialled.channel
    else:
        (connection,) = provider.inbound.all()
        channel = connection.channel
    return int(channel.socket.compress)


@pytest.mark.parametrize("compress", [True, False], ids=["compress", "plain"])
@pytest.mark.parametrize(
    ("language", "mode"), CASES, ids=[f"{language}-{mode}" for language, mode in CASES]
)
async def test_compress_deflates_both_ways_with_every_sdk(
    language: str, mode: str, compress: bool
) -> None:
    async with linked(language, mode, compress=compress) as (dispatcher, proxy):
        # Dial mode: the first call waits for the connection (connect_timeout_ms).
        answer = await dispatcher.call("example", "echo", PAYLOAD, timeout=START_TIMEOUT)
        assert answer == PAYLOAD
        window = negotiated_window(dispatcher, mode)
        sent = dict(proxy.forwarded)
    if compress:
        assert window == 15, f"{language} {mode}: permessage-deflate was not agreed"
        # The handshake, the hello and the deflated megabyte (a few KB) each way.
        assert max(sent.values()) < PAYLOAD_BYTES // 20, sent
    else:
        assert window == 0, f"{language} {mode}: deflate agreed though the target said no"
        assert min(sent.values()) > PAYLOAD_BYTES, sent
