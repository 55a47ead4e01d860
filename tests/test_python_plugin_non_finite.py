"""A method's result JSON cannot carry (a NaN, an infinity), on every transport of the SDK.

JSON has no NaN or infinity; orjson writes them as ``null``. Until 2026-12-07 a result of
``{"score": nan}`` reached the host over HTTP and gRPC as ``{"score": null}``, a different
answer and no word of it; over WebSocket it was refused, in words about params; Lambda's
runtime wrote a bare ``NaN`` (no JSON at all) and Knative's func-python answered an
object JSON has no form for with a plain 500, which the host took for a target down and
retried. Now it is that call's ``provider_error`` saying the result is not JSON, in a
batch that item's alone, on a stream the stream's error, and the plugin serves on. An
event whose data JSON cannot carry is not sent, and said once on stderr, on gRPC as on
WebSocket (on gRPC ``emit`` raised, and a NaN went as ``null``).

Real servers: ``dispatcher-plugin serve`` (HTTP, WebSocket) and ``grpc_server.main`` in a
subprocess each, called by the dispatcher through its providers.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from dispatcher import Dispatcher, PluginError, ProviderError
from linchkit_plugin import PluginHost
from linchkit_plugin.aws_lambda import LambdaPlugin
from linchkit_plugin.knative import KnativeFunction
from linchkit_plugin.wire import encode_result
from tests.conftest import manifest

SCORES_PLUGIN = """
import math
import sys

from linchkit_plugin import Plugin


class Scores(Plugin):
    def ok(self):
        return {"score": 1.5, "missing": None}

    def nan(self):
        return {"score": math.nan, "missing": None}

    async def inf(self):
        return [1.0, [-math.inf]]

    async def chunks(self):
        yield {"i": 0}
        yield {"i": math.inf}

    def refuses(self):
        from linchkit_plugin.errors import PluginError

        details = {"score": math.nan}
        raise PluginError("no score", remote_type="NoScore", details=details, retry_after=math.inf)

    async def events(self):
        self.emit("bad", {"x": math.nan})
        self.emit("good", {"x": 1})
        return True


if __name__ == "__main__":
    from linchkit_plugin.grpc_server import main

    sys.exit(main(Scores, plugin_id="scores", version="1.0.0", runtime="python"))
"""

METHODS = ("ok", "nan", "inf", "chunks", "events", "refuses")
WAIT = 30.0


class Stderr:
    """What a process writes on stderr, line by line as it comes."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._grew = asyncio.Condition()

    async def read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            async with self._grew:
                self.lines.append(line.decode())
                self._grew.notify_all()

    async def line_with(self, text: str) -> str:
        async with self._grew:
            await self._grew.wait_for(lambda: any(text in line for line in self.lines))
        (line,) = [line for line in self.lines if text in line]
        return line


@asynccontextmanager
async def scores_server(
    tmp_path: Path, mode: str, source: str = SCORES_PLUGIN
) -> AsyncIterator[tuple[dict[str, Any], Stderr]]:
    """The scores plugin (``source``: a module whose class ``Scores`` it is) served in
    ``mode`` (http, websocket, grpc): a target reaching it, and what the process writes
    on stderr."""
    (tmp_path / "scores_plugin.py").write_text(source)
    if mode == "grpc":
        command: tuple[str, ...] = (str(tmp_path / "scores_plugin.py"), "serve")
        command += ("--address", "127.0.0.1:0")
    else:
        command = ("-m", "linchkit_plugin.cli", "serve", "scores_plugin:Scores")
        command += ("--path", str(tmp_path), "--port", "0")
        if mode == "websocket":
            command += ("--websocket", "--id", "scores", "--version", "1.0.0")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = Stderr()
    reader = asyncio.create_task(stderr.read(process.stderr))
    try:
        async with asyncio.timeout(WAIT):
            if mode == "grpc":
                address = (await process.stdout.readline()).decode().split("|")[3]
                target = {"provider": "grpc", "address": address, "lifecycle": "dispatcher"}
            else:
                line = await stderr.line_with("listening on ")
                found = re.search(r"listening on ((?:ws|http)://[0-9.:]+)", line)
                assert found, line
                target = {"provider": mode, "url": found[1]}
        yield target, stderr
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        await reader


def scores_manifest(target: dict[str, Any], methods: tuple[str, ...] = METHODS) -> Any:
    return manifest(
        {
            "id": "scores",
            "version": "1.0.0",
            "target": target,
            "defaults": {"timeout_ms": int(WAIT * 1000)},
            "methods": {name: {} for name in methods},
        }
    )


def assert_not_json(error: ProviderError, shown: str) -> None:
    message = str(error)
    assert "result is not JSON" in message, message
    assert f"{shown} is not a JSON number" in message, message
    assert "params" not in message, message
    assert not error.retryable


@pytest.mark.parametrize("mode", ["http", "websocket", "grpc"])
async def test_a_non_finite_result_is_the_calls_provider_error_and_the_plugin_serves_on(
    tmp_path: Path, mode: str
) -> None:
    async with (
        scores_server(tmp_path, mode) as (target, _),
        Dispatcher(scores_manifest(target)) as dispatcher,
    ):
        with pytest.raises(ProviderError) as refused:
            await dispatcher.call("scores", "nan", {})
        assert_not_json(refused.value, "nan")
        with pytest.raises(ProviderError) as refused:
            await dispatcher.call("scores", "inf", {})
        assert_not_json(refused.value, "-inf")
        # A null the method returned is no NaN: the look for one finds none and lets it go.
        assert await dispatcher.call("scores", "ok", {}) == {"score": 1.5, "missing": None}


@pytest.mark.parametrize("mode", ["http", "websocket", "grpc"])
async def test_an_error_s_details_json_cannot_carry_are_left_out_not_the_error(
    tmp_path: Path, mode: str
) -> None:
    """Checked as a result is, the whole answer would have become an error about the
    plugin's result; before that, the NaN went as null."""
    async with (
        scores_server(tmp_path, mode) as (target, _),
        Dispatcher(scores_manifest(target)) as dispatcher,
    ):
        with pytest.raises(PluginError) as refused:
            await dispatcher.call("scores", "refuses", {})
        assert (refused.value.remote_type, refused.value.message) == ("NoScore", "no score")
        assert refused.value.details == {}
        assert refused.value.retry_after is None


@pytest.mark.parametrize("mode", ["websocket", "grpc"])
async def test_a_non_finite_chunk_ends_the_stream_with_a_provider_error(
    tmp_path: Path, mode: str
) -> None:
    async with (
        scores_server(tmp_path, mode) as (target, _),
        Dispatcher(scores_manifest(target)) as dispatcher,
    ):
        got: list[Any] = []

        async def read_the_stream() -> None:
            async for chunk in dispatcher.stream("scores", "chunks", {}):
                got.append(chunk)

        with pytest.raises(ProviderError) as refused:
            await read_the_stream()
        assert got == [{"i": 0}]
        assert_not_json(refused.value, "inf")
        assert await dispatcher.call("scores", "ok", {}) == {"score": 1.5, "missing": None}


@pytest.mark.parametrize("mode", ["websocket", "grpc"])
async def test_an_event_json_cannot_carry_is_not_sent_and_said_once(
    tmp_path: Path, mode: str
) -> None:
    async with (
        scores_server(tmp_path, mode) as (target, stderr),
        Dispatcher(scores_manifest(target)) as dispatcher,
    ):
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        dispatcher.on_event(lambda _plugin, _version, name, data: events.put_nowait((name, data)))
        await asyncio.sleep(0.5)  # the Events stream opens with the first route
        assert await dispatcher.call("scores", "events", {}) is True
        async with asyncio.timeout(WAIT):
            assert await events.get() == ("good", {"x": 1})
            line = await stderr.line_with("not sent")
        assert "event 'bad' not sent: the data of event 'bad' is not JSON: nan" in line, line
        assert events.empty()


async def test_over_http_a_batch_refuses_only_the_item_json_cannot_carry(tmp_path: Path) -> None:
    async with scores_server(tmp_path, "http") as (target, _), httpx.AsyncClient() as client:

        def item(method: str) -> dict[str, Any]:
            return {"v": 1, "plugin": "scores", "method": method, "params": {}, "context": {}}

        batch = {"batch": [item("nan"), item("ok"), item("inf")]}
        answer = await client.post(target["url"] + "/invoke", json=batch)
        nan, ok, inf = answer.json()["results"]
        assert ok == {"ok": True, "result": {"score": 1.5, "missing": None}}
        for refused in (nan, inf):
            assert refused["ok"] is False and refused["error"]["type"] == "provider_error"
            assert "result is not JSON" in refused["error"]["message"]


class Direct:
    """The scores methods, for the runtimes called here in-process (Lambda, Knative)."""

    def nan(self) -> dict[str, float]:
        return {"score": math.nan}

    def a_set(self) -> set[int]:
        return {1, 2}

    def ok(self) -> dict[str, Any]:
        return {"score": 1.5, "missing": None}


def _request(method: str) -> dict[str, Any]:
    return {"v": 1, "plugin": "direct", "method": method, "params": {}, "context": {}}


def test_on_lambda_the_answer_is_json_the_host_can_read() -> None:
    """The Lambda runtime encodes the handler's answer with Python's json, which writes a
    NaN as a bare ``NaN``: no JSON, and the host's reading of it failed as a target fault."""
    handler = LambdaPlugin(Direct)
    try:
        for method in ("nan", "a_set"):
            answer = handler({"batch": [_request(method), _request("ok")]}, None)
            refused, ok = answer["results"]
            assert refused["error"]["type"] == "provider_error", refused
            assert "result is not JSON" in refused["error"]["message"]
            assert ok == {"ok": True, "result": {"score": 1.5, "missing": None}}
            encode_result(answer)  # what the runtime sends is JSON
    finally:
        handler.close()


async def test_on_knative_the_answer_is_a_provider_error_not_a_500() -> None:
    function = KnativeFunction(PluginHost(Direct()))
    await function.open()
    try:
        for method in ("nan", "a_set"):
            status, answer = await function._answer(
                "dev.linchkit.plugin.call.v1", orjson.dumps(_request(method))
            )
            assert status == 200
            assert answer["error"]["type"] == "provider_error", answer
            assert "result is not JSON" in answer["error"]["message"]
    finally:
        await function.close()


@pytest.mark.parametrize(
    "value",
    [math.nan, -math.inf, {"a": [1, {"b": math.inf}]}, (1.0, float("nan"))],
    ids=["nan", "-inf", "nested", "tuple"],
)
def test_encode_result_refuses_what_json_cannot_carry(value: Any) -> None:
    with pytest.raises(
        ProviderError, match=r"the plugin's result is not JSON: .* is not a JSON number"
    ):
        encode_result(value)


def test_encode_result_keeps_none_and_finite_numbers_and_copies_down_to_size() -> None:
    data = encode_result({"a": None, "b": [1.5, -0.0, 1e308]})
    assert orjson.loads(data) == {"a": None, "b": [1.5, -0.0, 1e308]}
    assert sys.getsizeof(data) < 200  # not orjson's 4 KB working buffer
