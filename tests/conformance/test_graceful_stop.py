"""A plugin that stops gracefully under load loses no call, over gRPC and WebSocket.

A restart (a rollout, a drained node) sends the plugin SIGTERM while the host is still
calling it. Each call must then end one of two ways: answered, or refused in a way that
says it never reached the plugin's code (``never_sent``: the transport was gone, or grpc
saw the stream refused and resent it itself; a fleet sends such a call to another
instance, whatever the method). A call failed any other way is lost: the host cannot tell
whether it ran, so only an idempotent method may be sent again.

The load is the dispatcher's own (32 calls in flight), three stops per language and
binding, each plugin started afresh: ``provider: grpc`` to ``example-plugin serve``; over
WebSocket, ``provider: websocket`` dialling ``serve --websocket``, and a plugin dialling
the gateway (``connect``, reverse mode), each where the SDK has it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dispatcher import Dispatcher, DispatchError
from dispatcher.fleet import never_sent
from tests.conformance.conftest import (
    CONFIG,
    INBOUND_TOKEN,
    LANGUAGES,
    START_TIMEOUT,
    WEBSOCKET_MODES,
    _dialling_in,
    _manifest,
    _start_service,
    _start_websocket_service,
    _stop_service,
    executable,
)

pytestmark = [pytest.mark.toolchain, pytest.mark.slow]

CONCURRENCY = 32
STOPS = 3
#: How long the calls run before the plugin is told to stop, and on after it has exited.
LOAD_BEFORE_STOP = 0.4
LOAD_AFTER_EXIT = 0.2
#: How long a call waits for a dialled plugin that has exited to be back (its target's
#: ``connect_timeout_ms``, once the plugin is up).
GONE_WAIT_MS = 1000


CASES = [("grpc", language) for language in LANGUAGES] + [
    (mode, language) for language in LANGUAGES for mode in WEBSOCKET_MODES.get(language, ())
]


@contextlib.asynccontextmanager
async def _plugin(
    binding: str,
    language: str,
    stderr: int | None = None,
    config: dict[str, Any] = CONFIG,
    env: dict[str, str] | None = None,
) -> AsyncIterator[tuple[dict[str, Any], asyncio.subprocess.Process | None]]:
    """The target of a plugin to serve over ``binding``, and its process when that one
    is started here (a plugin dialling in is started once the dispatcher runs), its stderr
    to ``stderr`` (else ours), ``env`` added to our environment; ``config`` is what a
    WebSocket plugin runs its own lifecycle with."""
    path = executable(language)
    if binding == "inbound":
        yield {"provider": "websocket", "mode": "inbound", "token": INBOUND_TOKEN}, None
        return
    environment = {**os.environ, **env} if env else None
    if binding == "grpc":
        service, address = await _start_service(path, env=environment, stderr=stderr)
        target = {
            "provider": "grpc",
            "address": address,
            "lifecycle": "dispatcher",
            "connect_timeout_ms": int(START_TIMEOUT * 1000),
        }
    else:
        service, _, target = await _start_websocket_service(
            path, stderr=stderr, config=config, env=environment
        )
        # Once the plugin has exited, each call waits up to this for the redial that never
        # comes, then fails never sent: what is checked is how it fails, not how late.
        target = {**target, "connect_timeout_ms": GONE_WAIT_MS}
    try:
        yield target, service
    finally:
        await _stop_service(service)


async def _stopped_under_load(binding: str, language: str) -> collections.Counter[str]:
    """Start the plugin, call it from ``CONCURRENCY`` tasks, SIGTERM it mid-load; each
    call's outcome: answered, never sent, or lost (with the error's type and message)."""
    outcomes: collections.Counter[str] = collections.Counter()
    stopping = asyncio.Event()
    async with (
        _plugin(binding, language) as (target, service),
        Dispatcher(_manifest(target)) as dispatcher,
        contextlib.AsyncExitStack() as stack,
    ):
        if service is None:  # it dials the gateway
            service = await stack.enter_async_context(
                _dialling_in(executable(language), dispatcher)
            )

        async def caller() -> None:
            while not stopping.is_set():
                try:
                    await dispatcher.call("example", "echo", {"n": 1}, timeout=5)
                except DispatchError as error:
                    if never_sent(error):
                        outcomes["never sent"] += 1
                        await asyncio.sleep(0.001)  # the plugin is gone: no tight loop
                    else:
                        outcomes[f"lost: {type(error).__name__}: {error.message[:90]}"] += 1
                else:
                    outcomes["answered"] += 1

        callers = [asyncio.create_task(caller()) for _ in range(CONCURRENCY)]
        await asyncio.sleep(LOAD_BEFORE_STOP)
        service.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await service.wait()
        await asyncio.sleep(LOAD_AFTER_EXIT)
        stopping.set()
        await asyncio.gather(*callers)
    return outcomes


@pytest.mark.parametrize(
    ("binding", "language"), CASES, ids=[f"{binding}-{language}" for binding, language in CASES]
)
async def test_a_graceful_stop_under_load_loses_no_call(binding: str, language: str) -> None:
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(STOPS):
        outcomes += await _stopped_under_load(binding, language)
    lost = {outcome: count for outcome, count in outcomes.items() if outcome.startswith("lost")}
    assert outcomes["answered"] > 0, outcomes
    assert not lost, f"{sum(lost.values())} calls lost of {sum(outcomes.values())}: {lost}"
