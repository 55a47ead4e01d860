"""Draining: no new work, the work in flight finishes within a grace, the rest fails typed.

Against real servers: the SDK's HTTP plugin server (``echo_url``, its ``sleep`` method
holds a call as long as asked), the example plugin as a subprocess (its streams), and a
host process stopped with SIGTERM. Counts, not tight timings: the machine is shared, so
every bound on time has a generous margin.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from dispatcher import Dispatcher, InvalidParams, ShuttingDown, TargetUnavailable
from dispatcher._drain import CUT_OFF_SECONDS
from linchkit_plugin.errors import error_from_wire
from tests.conftest import EXAMPLES, ROOT, echo_plugin, manifest
from tests.test_stream_and_event_policies import example

#: What a slow, shared machine may add to a bound on time.
MARGIN = 5.0


def http_echo(url: str, **extra: Any) -> dict[str, Any]:
    return echo_plugin(
        "echo", {"provider": "http", "url": url}, defaults={"timeout_ms": 60_000}, **extra
    )


def established_to(url: str) -> int:
    """TCP connections of this process's network namespace open *to* ``url``'s port."""
    port = f"{urlsplit(url).port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table, encoding="ascii") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if fields[2].rsplit(":", 1)[1] == port and fields[3] == "01":  # ESTABLISHED
                    count += 1
    return count


def our_tasks(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks started since ``before`` that are not the in-process plugin server's."""
    return [task for task in asyncio.all_tasks() - before if not _served(task)]


def _served(task: asyncio.Task[Any]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    where = code.co_filename if code is not None else ""
    return "uvicorn" in where or "starlette" in where


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# -- calls in flight finish --------------------------------------------------------------


async def test_a_drain_with_1000_calls_in_flight_finishes_them_and_leaves_nothing(
    echo_url: str,
) -> None:
    before = asyncio.all_tasks()
    grace = 20.0
    dispatcher = Dispatcher(manifest(http_echo(echo_url)))
    async with dispatcher:
        calls = [
            asyncio.create_task(dispatcher.call("echo", "sleep", {"seconds": 0.05 + i % 10 / 50}))
            for i in range(1000)
        ]
        await until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"] == 1000)
        started = time.monotonic()
        await dispatcher.aclose(grace=grace)
        took = time.monotonic() - started
        results = await asyncio.gather(*calls, return_exceptions=True)
    finished = [result for result in results if isinstance(result, float)]
    refused = [result for result in results if isinstance(result, ShuttingDown)]
    assert len(finished) + len(refused) == 1000, {type(r) for r in results}
    assert len(finished) == 1000, "a grace this long lets every call finish"
    assert took < grace + MARGIN
    assert dispatcher.stats()["dispatcher"] == {
        "state": "closed",
        "draining": True,
        "calls_in_flight": 0,
        "streams_in_flight": 0,
    }
    await asyncio.sleep(0.05)  # the server side notices the closed connections
    assert our_tasks(before) == []
    assert established_to(echo_url) == 0


async def test_the_grace_running_out_fails_what_is_left_typed_and_in_time(echo_url: str) -> None:
    before = asyncio.all_tasks()
    grace = 0.3
    async with Dispatcher(manifest(http_echo(echo_url))) as dispatcher:
        quick = [
            asyncio.create_task(dispatcher.call("echo", "sleep", {"seconds": 0.0}))
            for _ in range(20)
        ]
        await asyncio.gather(*quick)
        slow = [
            asyncio.create_task(dispatcher.call("echo", "sleep", {"seconds": 3.0}))
            for _ in range(200)
        ]
        await until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"] == 200)
        started = time.monotonic()
        await dispatcher.drain(grace)
        took = time.monotonic() - started
        results = await asyncio.gather(*slow, return_exceptions=True)
        assert dispatcher.stats()["dispatcher"]["calls_in_flight"] == 0
        # The caller's task was not left cancelled: it goes on to handle the error.
        assert all(task.cancelling() == 0 for task in slow)
    assert took < grace + CUT_OFF_SECONDS + MARGIN
    assert all(isinstance(result, ShuttingDown) for result in results), {type(r) for r in results}
    error = results[0]
    assert isinstance(error, ShuttingDown)
    assert error.retryable and error.type == "shutting_down"
    assert error.details == {"stage": "cut_off"}
    assert "echo.sleep" in error.message
    await asyncio.sleep(0.05)
    assert our_tasks(before) == []
    assert established_to(echo_url) == 0


async def test_a_host_cancelling_its_own_call_still_gets_cancelled_error(echo_url: str) -> None:
    async with Dispatcher(manifest(http_echo(echo_url))) as dispatcher:
        call = asyncio.create_task(dispatcher.call("echo", "sleep", {"seconds": 5.0}))
        await until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"] == 1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert dispatcher.stats()["dispatcher"]["calls_in_flight"] == 0
        await dispatcher.drain(0.0)  # nothing in flight: returns at once


async def test_a_plugin_ignoring_its_cut_off_does_not_hold_the_drain() -> None:
    stubborn = {
        "id": "stubborn",
        "version": "1.0.0",
        "target": {"provider": "local", "entrypoint": "recording_plugin:StubbornPlugin"},
        "methods": {"stubborn": {"timeout_ms": 60_000}},
    }
    async with Dispatcher(manifest(stubborn)) as dispatcher:
        call = asyncio.create_task(dispatcher.call("stubborn", "stubborn", {"seconds": 3.0}))
        await until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"] == 1)
        started = time.monotonic()
        await dispatcher.drain(0.1)
        assert time.monotonic() - started < 0.1 + CUT_OFF_SECONDS + MARGIN
        assert not call.done(), "the plugin swallowed the cancellation"
        assert await call == "done anyway"  # its caller still gets an answer, and no hang


# -- new work is refused, queued batches go out --------------------------------------------


async def test_work_after_drain_is_refused_at_once_and_queued_batch_items_answer(
    echo_url: str,
) -> None:
    plugin = http_echo(
        echo_url, methods={"say": {"batch": {"max_size": 100, "max_wait_ms": 60_000}}}
    )
    async with Dispatcher(manifest(plugin)) as dispatcher:
        queued = [
            asyncio.create_task(dispatcher.call("echo", "say", {"text": str(i)})) for i in range(5)
        ]
        await until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"] == 5)
        assert not any(task.done() for task in queued)
        started = time.monotonic()
        drain = asyncio.create_task(dispatcher.drain(30.0))
        await asyncio.sleep(0)  # the drain has begun
        assert dispatcher.draining and dispatcher.state == "draining"

        for attempt in (
            dispatcher.call("echo", "say", {"text": "late"}),
            dispatcher.call("no-such-plugin", "x"),  # refused before any lookup
            dispatcher.publish("echo", "config.changed", {}),
            anext(dispatcher.stream("echo", "say", {"text": "late"})),
        ):
            with pytest.raises(ShuttingDown) as refused:
                await attempt
            assert refused.value.retryable
            assert refused.value.details == {"stage": "refused"}
            assert "draining" in refused.value.message

        stats = dispatcher.stats()["dispatcher"]
        assert stats["draining"] and stats["state"] == "draining"
        reports = await dispatcher.health()
        assert reports and all(report.draining for report in reports)

        second = asyncio.create_task(dispatcher.drain(0.0))  # waits for the first
        await drain
        await second
        took = time.monotonic() - started
        results = await asyncio.gather(*queued)
    assert [result["text"] for result in results] == ["0", "1", "2", "3", "4"]
    assert took < 60.0 / 2, "queued items went out at once, not at the end of their window"


async def test_a_dispatcher_that_does_not_drain_reports_so() -> None:
    from tests.conftest import LOCAL_TARGET

    async with Dispatcher(manifest(echo_plugin("echo", LOCAL_TARGET))) as dispatcher:
        assert dispatcher.stats()["dispatcher"]["draining"] is False
        assert not any(report.draining for report in await dispatcher.health())
        assert dispatcher.state == "running"


@pytest.mark.parametrize("grace", [-1, math.nan, math.inf, "5", None, True])
async def test_a_drain_needs_a_sane_grace(grace: Any) -> None:
    from tests.conftest import LOCAL_TARGET

    async with Dispatcher(manifest(echo_plugin("echo", LOCAL_TARGET))) as dispatcher:
        with pytest.raises(InvalidParams):
            await dispatcher.drain(grace)
        with pytest.raises(InvalidParams):
            dispatcher.drain_on_signal(grace=grace)
        assert not dispatcher.draining
        assert await dispatcher.call("echo", "say", {"text": "still here"})


def test_shutting_down_travels_on_the_wire() -> None:
    error = ShuttingDown("draining", details={"stage": "refused"})
    again = error_from_wire(error.to_wire())
    assert type(again) is ShuttingDown
    assert again.retryable and again.details == {"stage": "refused"}


# -- streams ---------------------------------------------------------------------------


async def test_a_stream_held_past_the_grace_is_cut_off() -> None:
    async with Dispatcher(manifest(example())) as dispatcher:
        finished = [chunk async for chunk in dispatcher.stream("example", "count", {"n": 2})]
        assert finished == [{"i": 0}, {"i": 1}]
        held = dispatcher.stream("example", "count", {"n": 3})
        assert await anext(held) == {"i": 0}
        assert dispatcher.stats()["dispatcher"]["streams_in_flight"] == 1
        started = time.monotonic()
        await dispatcher.drain(0.2)
        assert time.monotonic() - started < 0.2 + MARGIN
        assert dispatcher.stats()["dispatcher"]["streams_in_flight"] == 0
        with pytest.raises(ShuttingDown) as caught:
            await anext(held)
        assert caught.value.details == {"stage": "cut_off"}


# -- SIGTERM ---------------------------------------------------------------------------

HOST = textwrap.dedent(
    """
    import asyncio, json, sys
    from dispatcher import Dispatcher, ShuttingDown, parse_manifest

    MANIFEST = {"version": 1, "plugins": [{
        "id": "echo", "version": "1.0.0",
        "target": {"provider": "local", "entrypoint": "echo_plugin:EchoPlugin"},
        "methods": {"sleep": {}, "say": {}},
    }]}

    async def main() -> None:
        async with Dispatcher(parse_manifest(MANIFEST)) as dispatcher:
            dispatcher.drain_on_signal(grace=30.0)
            calls = [
                asyncio.create_task(dispatcher.call("echo", "sleep", {"seconds": 1.0}))
                for _ in range(50)
            ]
            await asyncio.sleep(0.1)
            print("ready", flush=True)
            while not dispatcher.draining:
                await asyncio.sleep(0.005)
            try:
                await dispatcher.call("echo", "say", {"text": "late"})
                late = "answered"
            except ShuttingDown as error:
                late = error.details["stage"]
            await dispatcher.wait_closed()
            results = await asyncio.gather(*calls, return_exceptions=True)
        print(json.dumps({
            "finished": sum(isinstance(result, float) for result in results),
            "late": late,
            "state": dispatcher.state,
            "tasks": len(asyncio.all_tasks()),
        }), flush=True)

    asyncio.run(main())
    """
)


async def test_sigterm_drains_the_calls_in_flight_and_the_host_exits_0(tmp_path: Path) -> None:
    script = tmp_path / "host.py"
    script.write_text(HOST, encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python"), str(EXAMPLES)]),
    }
    host = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert host.stdout is not None
        line = await asyncio.wait_for(host.stdout.readline(), 60)
        assert line == b"ready\n", line
        host.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(host.communicate(), 60)
    finally:
        if host.returncode is None:
            host.kill()
            await host.wait()
    assert host.returncode == 0, err.decode()
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report == {"finished": 50, "late": "refused", "state": "closed", "tasks": 1}


async def test_aclose_without_grace_cuts_off_an_in_process_call_at_once() -> None:
    """A call of an in-process plugin ran on after ``aclose`` had stopped its plugin, and
    answered; a later call said ``plugin_not_found``, as if it had never existed."""
    from tests.conftest import LOCAL_TARGET

    dispatcher = Dispatcher(manifest(echo_plugin("echo", LOCAL_TARGET)))
    await dispatcher.start()
    call = asyncio.create_task(dispatcher.call("echo", "sleep", {"seconds": 5}))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await dispatcher.aclose()
    with pytest.raises(ShuttingDown) as cut:
        await asyncio.wait_for(call, 2)
    assert cut.value.details["stage"] == "cut_off"
    assert time.monotonic() - started < 2
    with pytest.raises(ShuttingDown) as refused:
        await dispatcher.call("echo", "say", {"text": "late"})
    assert refused.value.retryable and refused.value.details["stage"] == "refused"


async def _served_echo() -> tuple[asyncio.subprocess.Process, str]:
    """``dispatcher-plugin serve`` of the example plugin in a process of its own, and its URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "linchkit_plugin.cli", "serve", "echo_plugin:EchoPlugin",
        "--path", str(EXAMPLES), "--port", "0",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
    found = re.search(r"listening on (http://[0-9.:]+)", line)
    assert found, line
    return process, found.group(1)


async def _stopped(process: asyncio.subprocess.Process | None) -> None:
    if process is not None and process.returncode is None:
        process.kill()
        await process.wait()


@pytest.mark.parametrize("provider", ["local", "subprocess", "http"])
async def test_aclose_cuts_off_a_call_in_flight_alike_on_every_provider(provider: str) -> None:
    """The dispatcher closing under a call is its own doing: ``ShuttingDown``, stage
    ``cut_off``, on every provider; subprocess said the plugin went away, HTTP
    ``ServerDisconnectedError``, both ``TargetUnavailable`` inviting a retry."""
    from tests.conftest import LOCAL_TARGET

    served = None
    try:
        if provider == "local":
            spec = echo_plugin("echo", LOCAL_TARGET)
        elif provider == "subprocess":
            spec = {**example(), "id": "echo"}
        else:
            served, url = await _served_echo()
            spec = http_echo(url)
        # The subprocess example's sleep takes milliseconds, the echo plugin's seconds.
        unit, scale = ("ms", 1000) if provider == "subprocess" else ("seconds", 1)
        dispatcher = Dispatcher(manifest(spec))
        await dispatcher.start()
        assert await dispatcher.call("echo", "sleep", {unit: 0}, timeout=30) is not None
        call = asyncio.create_task(dispatcher.call("echo", "sleep", {unit: 5 * scale}, timeout=30))
        await asyncio.sleep(0.3)
        await dispatcher.aclose()
        with pytest.raises(ShuttingDown) as cut:
            await asyncio.wait_for(call, MARGIN)
    finally:
        await _stopped(served)
    assert cut.value.details == {"stage": "cut_off"}, cut.value
    assert "the dispatcher shut down" in str(cut.value)
    if provider != "local":  # the provider's own account, kept as the cause
        assert isinstance(cut.value.__cause__, TargetUnavailable), repr(cut.value.__cause__)


async def test_an_http_plugin_going_away_while_the_dispatcher_runs_is_still_unavailable() -> None:
    served, url = await _served_echo()
    try:
        async with Dispatcher(manifest(http_echo(url))) as dispatcher:
            assert await dispatcher.call("echo", "sleep", {"seconds": 0}, timeout=30) >= 0
            call = asyncio.create_task(dispatcher.call("echo", "sleep", {"seconds": 5}, timeout=30))
            await asyncio.sleep(0.3)
            served.kill()
            with pytest.raises(TargetUnavailable):
                await asyncio.wait_for(call, MARGIN)
    finally:
        await _stopped(served)
