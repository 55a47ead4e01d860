"""A plugin's own message over the host's cap, against each SDK's real plugin process and
the real dispatcher, in both WebSocket modes (docs/protocol.md, "WebSocket binding",
"Message size").

The host announces the largest message it reads (dial mode: the upgrade request's
``LinchKit-Max-Message-Bytes``; inbound: the ``welcome`` frame's ``max_message_bytes``),
and a plugin refuses its own larger message instead of sending it: a result is that
call's ``provider_error`` with ``details.reason`` ``too_large``, a chunk ends its stream
with that error, an event is not sent (the first of a connection said on stderr). Each
case has a call in flight meanwhile, which must end well: the connection stays.

Before, every SDK sent the message, the host closed the connection (1009), and every
call in flight on it failed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from dispatcher import Dispatcher, InvalidParams, ProviderError
from tests.conformance.conftest import (
    INBOUND_TOKEN,
    LANGUAGES,
    WEBSOCKET_MODES,
    _dialling_in,
    _manifest,
    _start_websocket_service,
    _stop_service,
    executable,
)

CASES = [(language, mode) for language in LANGUAGES for mode in WEBSOCKET_MODES.get(language, ())]
#: The host's cap in these cases: small, so that a message over it is cheap to make.
CAP = 32 * 1024
#: A plugin config whose ``config`` answer is over CAP.
LARGE_CONFIG = {"region": "eu", "blob": "x" * (CAP + 8_000)}
#: The SDKs' own cap, which the host's default (``max_message_bytes``) equals.
DEFAULT_CAP = 8 * 1024 * 1024
WARNING = "over the WebSocket message cap"
#: How long the call in flight meanwhile runs.
SLEEP_MS = 2000

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Linked:
    dispatcher: Dispatcher
    stderr: Path
    events: asyncio.Queue[tuple[str, Any]]

    async def next_event(self, timeout: float = 10.0) -> tuple[str, Any]:
        async with asyncio.timeout(timeout):
            return await self.events.get()

    def warnings(self) -> list[str]:
        text = self.stderr.read_text(errors="replace")
        return [line for line in text.splitlines() if WARNING in line]


@contextlib.asynccontextmanager
async def linked(language: str, mode: str, folder: Path, **target: Any) -> AsyncIterator[Linked]:
    """``language``'s example plugin, given LARGE_CONFIG, and a dispatcher whose target
    says ``target`` (``max_message_bytes`` above all), connected in ``mode``."""
    path = executable(language)
    stderr = folder / f"{language}-{mode}.stderr"
    service = None
    with stderr.open("wb") as sink:
        try:
            if mode == "websocket":
                service, _, dialled = await _start_websocket_service(
                    path, stderr=sink.fileno(), config=LARGE_CONFIG
                )
            else:
                dialled = {"provider": "websocket", "mode": "inbound", "token": INBOUND_TOKEN}
            events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
            async with Dispatcher(_manifest({**dialled, **target})) as dispatcher:
                dispatcher.on_event(lambda _p, _v, event, data: events.put_nowait((event, data)))
                found = Linked(dispatcher, stderr, events)
                if mode == "websocket":
                    yield found
                else:
                    async with _dialling_in(
                        path, dispatcher, stderr=sink.fileno(), config=LARGE_CONFIG
                    ):
                        yield found
        finally:
            if service is not None:
                await _stop_service(service)


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="module",
    params=CASES,
    ids=[f"{language}-{mode}" for language, mode in CASES],
)
async def capped(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Linked]:
    language, mode = request.param
    folder = tmp_path_factory.mktemp("oversized")
    async with linked(language, mode, folder, max_message_bytes=CAP) as found:
        yield found


@contextlib.asynccontextmanager
async def call_in_flight(dispatcher: Dispatcher) -> AsyncIterator[None]:
    """A call on the connection while the case's oversized message is made, which must
    end well: a connection closed under it (1009) would fail it."""
    sleeping = asyncio.create_task(dispatcher.call("example", "sleep", {"ms": SLEEP_MS}))
    await asyncio.sleep(0.2)  # sent, and running in the plugin
    try:
        yield
    except BaseException:
        sleeping.cancel()
        raise
    assert await sleeping == {"slept_ms": SLEEP_MS}


async def read_stream(dispatcher: Dispatcher, params: dict[str, int], into: list[Any]) -> None:
    """``count``'s chunks, into ``into`` as they come, until it ends or fails."""
    async for chunk in dispatcher.stream("example", "count", params):
        into.append(chunk)


def assert_too_large(error: ProviderError, what: str, limit: int) -> None:
    assert error.details.get("reason") == "too_large", (error.message, error.details)
    assert error.details.get("limit") == limit, error.details
    assert error.details.get("bytes", 0) > limit, error.details
    assert not error.retryable
    assert what in error.message and f"{limit} bytes" in error.message, error.message


async def test_a_result_over_the_host_s_cap_fails_its_call_typed_and_the_connection_stays(
    capped: Linked,
) -> None:
    dispatcher = capped.dispatcher
    async with call_in_flight(dispatcher):
        with pytest.raises(ProviderError) as refused:
            await dispatcher.call("example", "config", None)
    assert_too_large(refused.value, "the result of config", CAP)
    assert await dispatcher.call("example", "echo", {"small": True}) == {"small": True}


async def test_a_chunk_over_the_host_s_cap_ends_its_stream_typed_and_the_connection_stays(
    capped: Linked,
) -> None:
    dispatcher = capped.dispatcher
    received: list[Any] = []
    async with call_in_flight(dispatcher):
        with pytest.raises(ProviderError) as refused:
            await read_stream(dispatcher, {"n": 3, "pad": CAP}, received)
    assert received == []
    assert_too_large(refused.value, "a chunk of count", CAP)
    chunks = [chunk async for chunk in dispatcher.stream("example", "count", {"n": 2, "pad": 10})]
    assert chunks == [{"i": 0, "pad": "x" * 10}, {"i": 1, "pad": "x" * 10}]


async def test_an_event_over_the_host_s_cap_is_not_sent_said_once_and_the_connection_stays(
    capped: Linked,
) -> None:
    dispatcher = capped.dispatcher
    async with call_in_flight(dispatcher):
        for _ in range(2):
            assert await dispatcher.call("example", "emit", {"name": "large", "pad": CAP}) is True
        assert await dispatcher.call("example", "emit", {"name": "small", "data": 1}) is True
        # Events go out in order: once the small one is here, both large ones were refused.
        assert await capped.next_event() == ("small", 1)
    assert capped.events.empty()
    async with asyncio.timeout(10):
        while not capped.warnings():  # noqa: ASYNC110 (another process's stderr: no event)
            await asyncio.sleep(0.05)
    (warning,) = capped.warnings()
    assert "large" in warning and f"{CAP} bytes" in warning, warning


@pytest.mark.parametrize(("language", "mode"), CASES, ids=[f"{lang}-{m}" for lang, m in CASES])
async def test_a_chunk_over_the_default_cap_is_refused_by_the_plugin_itself(
    language: str, mode: str, tmp_path: Path
) -> None:
    """The target's default ``max_message_bytes``, 8 MiB, the SDKs' own cap: a 9 MB chunk
    is the plugin's refusal, not the host's close."""
    async with linked(language, mode, tmp_path) as found, call_in_flight(found.dispatcher):
        with pytest.raises(ProviderError) as refused:
            await read_stream(found.dispatcher, {"n": 1, "pad": 9_000_000}, [])
    assert_too_large(refused.value, "a chunk of count", DEFAULT_CAP)


@pytest.mark.parametrize(("language", "mode"), CASES, ids=[f"{lang}-{m}" for lang, m in CASES])
async def test_a_call_over_what_the_plugin_reads_is_refused_before_it_is_sent(
    language: str, mode: str, tmp_path: Path
) -> None:
    """A target that allows 16 MiB, a plugin that reads 8 MiB (its hello says so): a 9 MB
    call is the caller's ``too_large``, never sent, and the connection stays."""
    async with (
        linked(language, mode, tmp_path, max_message_bytes=2 * DEFAULT_CAP) as found,
        call_in_flight(found.dispatcher),
    ):
        with pytest.raises(InvalidParams) as refused:
            await found.dispatcher.call("example", "echo", {"blob": "x" * 9_000_000})
    assert refused.value.details["reason"] == "too_large", refused.value.details
    assert refused.value.details["limit"] == DEFAULT_CAP, refused.value.details
