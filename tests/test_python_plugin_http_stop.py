"""``dispatcher-plugin serve`` (the HTTP binding, uvicorn) stops as the other bindings do.

On SIGTERM it takes no new connection, gives the calls in flight ``STOP_GRACE_SECONDS``
(5 s) to finish, cancels what still runs then, and only after that runs the plugin's
``stop`` and ``destroy`` hooks (the ASGI lifespan's shutdown), 5 s at most together
(docs/protocol.md, "Stopping while called"). Before, uvicorn waited for the calls in
flight without a bound (a call of 30 s held the stop 30 s) and the lifespan awaited the
hooks without one (a stuck hook held it for ever).

A call cut off at the end of the grace is answered with the binding's error envelope,
``503`` and ``target_unavailable`` (retryable) with ``details["stage"] == "in_flight"``:
the plugin is going away and the call may have run, as the WebSocket provider says of a
call cut off by its plugin's goaway. Before, uvicorn answered it a plain-text ``500``,
which the host could not tell from the plugin crashing.

The plugin is the Python example (``sdk/python/examples``), served over real HTTP on
127.0.0.1 and called with httpx or the dispatcher; with ``say_hooks`` in its config its
hooks each write a line to stderr, which says that they ran, and when. The grace and the
hooks' cap are 5 s unless ``LINCHKIT_PLUGIN_STOP_GRACE_MS`` and ``_STOP_HOOKS_MS`` set
them: a call past the grace is cut off at the default 5 s (pinned here), the other stops
that wait for a cap wait the 1 s these variables set.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from dispatcher import Dispatcher, DispatchError, TargetUnavailable
from linchkit_plugin.host import STOP_GRACE_SECONDS, STOP_HOOKS_SECONDS
from linchkit_plugin.stopping import STOP_GRACE_ENV, STOP_HOOKS_ENV
from tests.conftest import ROOT, manifest

SOURCE_PATH = os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python")])
#: How long the call runs before the plugin is told to stop.
IN_FLIGHT_BEFORE_STOP = 0.5
#: The grace or the hooks' cap a stop is given where it is set (1 s).
CONFIGURED_CAP = 1.0


@dataclass
class Stopped:
    """What one call across a stop saw."""

    #: The call's answer (its JSON body), or the error it ended in.
    answer: Any
    #: The answer's HTTP status (0 when the call ended in an error).
    status: int
    #: How long after the SIGTERM the plugin exited.
    exited_after: float
    #: The lines the plugin wrote to stderr, each with when (seconds after the SIGTERM).
    said: list[tuple[float, str]]
    #: When the call ended, seconds after the SIGTERM.
    answered_after: float
    #: The plugin's exit status.
    returncode: int | None = None


@asynccontextmanager
async def _serving(
    config: dict[str, Any], env: dict[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "linchkit_plugin.cli",
        "serve",
        "example_plugin:ExamplePlugin",
        "--path",
        str(ROOT / "sdk" / "python" / "examples"),
        "--port",
        "0",
        "--config",
        orjson.dumps(config).decode(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": SOURCE_PATH, **(env or {})},
    )
    try:
        assert process.stderr is not None
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        found = re.search(r"listening on (http://[0-9.:]+)", line)
        assert found, line
        yield process, found.group(1)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _call_across_a_stop(
    method: str,
    params: dict[str, Any],
    config: dict[str, Any] | None = None,
    *,
    through_dispatcher: bool = False,
    env: dict[str, str] | None = None,
) -> Stopped:
    """Call ``method`` with httpx (or, ``through_dispatcher``, with a dispatcher's ``http``
    target), SIGTERM the plugin (started with ``env`` added to ours) while the call runs."""
    async with _serving({"say_hooks": True, **(config or {})}, env) as (process, url):
        assert process.stderr is not None
        stderr = process.stderr
        stopped_at = 0.0
        said: list[tuple[float, str]] = []

        async def read_stderr() -> None:
            async for line in stderr:
                said.append((time.monotonic() - stopped_at, line.decode(errors="replace")))

        async def call() -> tuple[Any, int, float]:
            envelope = {"v": 1, "plugin": "example", "method": method, "params": params}
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                try:
                    response = await client.post("/invoke", json=envelope)
                except httpx.HTTPError as error:
                    return error, 0, time.monotonic() - stopped_at
            try:
                answer: Any = response.json()
            except ValueError:  # not the binding's envelope: uvicorn's own answer
                answer = response.text
            return answer, response.status_code, time.monotonic() - stopped_at

        async def call_through_dispatcher() -> tuple[Any, int, float]:
            plugin = {
                "id": "example",
                "version": "1.0.0",
                "target": {"provider": "http", "url": url},
                "methods": {method: {}},
            }
            async with Dispatcher(manifest(plugin)) as dispatcher:
                try:
                    result = await dispatcher.call("example", method, params, timeout=60)
                except DispatchError as error:
                    return error, 0, time.monotonic() - stopped_at
            return result, 200, time.monotonic() - stopped_at

        reading = asyncio.create_task(read_stderr())
        calling = asyncio.create_task(call_through_dispatcher() if through_dispatcher else call())
        await asyncio.sleep(IN_FLIGHT_BEFORE_STOP)
        assert not calling.done(), calling
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STOP_GRACE_SECONDS + STOP_HOOKS_SECONDS + 10):
            answer, status, answered_after = await calling
            await process.wait()
            exited_after = time.monotonic() - stopped_at
            await reading
    return Stopped(answer, status, exited_after, said, answered_after, process.returncode)


def _hooks(stopped: Stopped) -> list[tuple[float, str]]:
    return [(at, line.strip()) for at, line in stopped.said if line.startswith("example: ")]


async def test_a_call_in_flight_at_a_stop_is_answered_and_the_hooks_run_after_it() -> None:
    stopped = await _call_across_a_stop("hooks", {"after_ms": 2_000})
    # Started by the lifespan, not yet stopped when the call finished.
    assert stopped.answer == {
        "ok": True,
        "result": {"init": 1, "start": 1, "stop": 0, "destroy": 0},
    }
    hooks = _hooks(stopped)
    assert [line for _, line in hooks] == ["example: stop hook ran", "example: destroy hook ran"]
    assert all(at >= stopped.answered_after for at, _ in hooks), (stopped, hooks)
    # A graceful stop exits 0, as the SDK's gRPC and WebSocket executables do. Before, 143:
    # uvicorn raised the SIGTERM again once it had shut down, and its default action ended
    # the process.
    assert stopped.returncode == 0, stopped


async def test_a_call_past_the_grace_is_cut_off_then_the_hooks_run() -> None:
    # No LINCHKIT_PLUGIN_STOP_GRACE_MS: the default grace, pinned here.
    stopped = await _call_across_a_stop("sleep", {"ms": 30_000})
    # Cancelled at the end of the grace, and answered so in the binding's envelope (before,
    # uvicorn's plain-text 500): the plugin is going away, and the call may have run.
    assert stopped.status == 503, stopped
    error = stopped.answer["error"]
    assert stopped.answer["ok"] is False, stopped
    assert (error["type"], error["retryable"], error["details"]) == (
        "target_unavailable",
        True,
        {"stage": "in_flight"},
    ), stopped
    assert "stopping" in error["message"], stopped
    assert STOP_GRACE_SECONDS - 1 <= stopped.answered_after < STOP_GRACE_SECONDS + 1, stopped
    assert STOP_GRACE_SECONDS - 1 <= stopped.exited_after < STOP_GRACE_SECONDS + 3, stopped
    hooks = [line for _, line in _hooks(stopped)]
    assert hooks == ["example: stop hook ran", "example: destroy hook ran"], stopped.said


async def test_a_stop_hook_that_never_returns_does_not_keep_the_server() -> None:
    ms = 1_000
    stopped = await _call_across_a_stop(
        "sleep",
        {"ms": ms},
        {"stall_hook": "stop"},
        env={STOP_HOOKS_ENV: str(int(CONFIGURED_CAP * 1000))},
    )
    assert stopped.answer == {"ok": True, "result": {"slept_ms": ms}}
    assert "example: stop hook ran" in [line for _, line in _hooks(stopped)]
    # Abandoned at the configured cap, which the warning names.
    assert any("stop hook did not finish within 1 s" in line for _, line in stopped.said)
    hooks_from = ms / 1000 - IN_FLIGHT_BEFORE_STOP
    assert hooks_from + CONFIGURED_CAP - 0.5 <= stopped.exited_after, stopped
    assert stopped.exited_after < hooks_from + CONFIGURED_CAP + 3, stopped
    # A stop that gave up on a hook exits 0 too, as in the other executables.
    assert stopped.returncode == 0, stopped


async def test_a_call_cut_off_by_the_stop_reaches_the_dispatcher_as_a_typed_error() -> None:
    # At the end of a grace of 1 s, as LINCHKIT_PLUGIN_STOP_GRACE_MS sets it.
    stopped = await _call_across_a_stop(
        "sleep",
        {"ms": 30_000},
        through_dispatcher=True,
        env={STOP_GRACE_ENV: str(int(CONFIGURED_CAP * 1000))},
    )
    # The plugin's own words, not a status the provider guesses from ("failed with HTTP
    # 500", as a crash reads): retryable, and not "never sent", so only a retry policy
    # (for a method safe to run twice) sends it again, and a fleet does not fail it over.
    error = stopped.answer
    assert isinstance(error, TargetUnavailable), stopped
    assert error.retryable, error
    assert error.details == {"stage": "in_flight"}, error
    assert "the plugin is stopping" in error.message, error
    assert CONFIGURED_CAP - 0.5 <= stopped.answered_after < CONFIGURED_CAP + 2, stopped
