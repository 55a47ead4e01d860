"""A call the host cancels reaches a plugin served over HTTP: its method is cancelled.

The host closes its connection when its caller cancels a call (the aiohttp client);
``dispatcher-plugin serve`` used to notice only while it read the request body, so the
method ran on to its end or its deadline (30 s by default), where on local and subprocess
targets it is cancelled. Now the server watches for the disconnect while the method runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from dispatcher import Dispatcher
from tests.conftest import ROOT, manifest
from tests.test_http_clients import ABANDONING

IMPLEMENTATIONS = pytest.mark.parametrize("http", ["httptools", "h11"])
SLEEP = 3.0  # the method's own length: "done" would be marked this long after its start


@contextlib.asynccontextmanager
async def serving(marks: Path, http: str = "httptools") -> AsyncIterator[str]:
    """``dispatcher-plugin serve`` of ``CancelMarksPlugin`` on a free port; yields its URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "linchkit_plugin.cli",
        "serve",
        "cancel_marks_plugin:CancelMarksPlugin",
        "--path",
        str(ROOT / "tests" / "plugins"),
        "--port",
        "0",
        "--http",
        http,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CANCEL_MARKS_DIR": str(marks)},
    )
    assert process.stderr is not None
    try:
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        found = re.search(r"listening on (http://[0-9.:]+)", line)
        assert found, line
        yield found.group(1)
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()


def marked(marks: Path) -> set[str]:
    return {path.name for path in marks.iterdir()}


async def until_marked(marks: Path, name: str, within: float) -> float:
    """Seconds until ``name`` is marked; fails after ``within``."""
    started = time.monotonic()
    while name not in marked(marks):
        assert time.monotonic() - started < within, (
            f"no {name!r} within {within} s: {marked(marks)}"
        )
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def cancelled_after(call: Any, seconds: float) -> None:
    task = asyncio.ensure_future(call)
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def assert_cancelled_not_done(marks: Path, tag: str) -> None:
    assert f"start-{tag}" in marked(marks)
    await until_marked(marks, f"cancelled-{tag}", within=1.0)
    await asyncio.sleep(SLEEP)  # past the method's own end
    assert f"done-{tag}" not in marked(marks), marked(marks)


def envelope(tag: str) -> dict[str, Any]:
    params = {"seconds": SLEEP, "tag": tag}
    return {"v": 1, "plugin": "marks", "method": "slow", "params": params, "context": {}}


async def post(url: str, body: dict[str, Any]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/invoke", data=orjson.dumps(body), headers={"content-type": "application/json"}
        ) as answer,
    ):
        await answer.read()


@IMPLEMENTATIONS
async def test_a_client_that_hangs_up_cancels_the_method(tmp_path: Path, http: str) -> None:
    async with serving(tmp_path, http) as url:
        await cancelled_after(post(url, envelope("single")), 0.3)
        await assert_cancelled_not_done(tmp_path, "single")


async def test_a_client_that_hangs_up_cancels_every_item_of_its_batch(tmp_path: Path) -> None:
    async with serving(tmp_path) as url:
        batch = {"batch": [envelope("one"), envelope("two")]}
        await cancelled_after(post(url, batch), 0.3)
        await until_marked(tmp_path, "cancelled-one", within=1.0)
        await assert_cancelled_not_done(tmp_path, "two")
        assert "done-one" not in marked(tmp_path)


@pytest.mark.parametrize("client", ABANDONING)
async def test_a_call_cancelled_through_the_dispatcher_cancels_the_plugin_s_method(
    tmp_path: Path, client: str
) -> None:
    """The user's view: ``Dispatcher.call`` on an http target, cancelled 0.3 s in (reqwest
    does not close the connection of a cancelled call, so its plugin never learns it)."""
    async with serving(tmp_path) as url:
        plugin = {
            "id": "marks",
            "version": "1.0.0",
            "target": {"provider": "http", "url": url, "client": client},
            "methods": {"slow": {"timeout_ms": 10_000}},
        }
        async with Dispatcher(manifest(plugin)) as dispatcher:
            call = dispatcher.call("marks", "slow", {"seconds": SLEEP, "tag": "host"})
            await cancelled_after(call, 0.3)
            await assert_cancelled_not_done(tmp_path, "host")
            # The server goes on serving, on a new connection.
            answer = await dispatcher.call("marks", "slow", {"seconds": 0.01, "tag": "after"})
            assert answer == "after"


async def test_a_call_that_ends_is_answered_and_not_cancelled(tmp_path: Path) -> None:
    async with serving(tmp_path) as url:
        slow = {**envelope("whole"), "params": {"seconds": 0.2, "tag": "whole"}}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{url}/invoke",
                data=orjson.dumps(slow),
                headers={"content-type": "application/json"},
            ) as answer,
        ):
            assert answer.status == 200
            assert (await answer.json())["result"] == "whole"
        assert marked(tmp_path) == {"start-whole", "done-whole"}


async def test_fifty_calls_cancelled_at_once_are_all_cancelled_and_it_goes_on_serving(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as url:
        plugin = {
            "id": "marks",
            "version": "1.0.0",
            "target": {"provider": "http", "url": url},
            "methods": {"slow": {"timeout_ms": 10_000}},
        }
        async with Dispatcher(manifest(plugin)) as dispatcher:
            calls = [
                asyncio.ensure_future(
                    dispatcher.call("marks", "slow", {"seconds": SLEEP, "tag": str(n)})
                )
                for n in range(50)
            ]
            await asyncio.sleep(0.5)
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            for n in range(50):
                await until_marked(tmp_path, f"cancelled-{n}", within=2.0)
            answer = await dispatcher.call("marks", "slow", {"seconds": 0.01, "tag": "after"})
            assert answer == "after"
            assert not {name for name in marked(tmp_path) if name.startswith("done-")} - {
                "done-after"
            }
