"""An in-process plugin's result, chunk or event JSON cannot carry, through the gateway
and ``dispatcher call``.

A local plugin's answer reaches the gateway as a Python object, not through any wire that
would have refused it: ``{"ratio": nan}`` went out as ``{"ratio": null}`` on the HTTP port
and the gRPC port's ``result_json``, and an event's NaN data as ``null`` to every
subscriber. Now the call is ``provider_error`` (the plugin's result is not JSON), on both
HTTP stacks (the call lane and aiohttp's route) and on the gRPC port (``Call`` and
``Stream``); the event is dropped with one warning, as one whose data JSON has no form for
was already. ``dispatcher call`` printed the NaN as ``null`` and a set as a traceback: both
are the call's error now, printed as any other (``{"error": …}``, exit 1).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import orjson
import pytest

from dispatcher import Dispatcher, PluginError
from dispatcher.gateway import GatewaySettings
from linchkit_plugin._proto import gateway_pb2, gateway_pb2_grpc
from tests.conftest import manifest
from tests.gateway_support import running_gateway

SCORES_PLUGIN = """
import math

from linchkit_plugin import Plugin


class Scores(Plugin):
    async def ok(self):
        return {"ratio": 0.5, "missing": None}

    async def nan(self):
        return {"ratio": math.nan}

    async def chunks(self):
        yield {"i": 0}
        yield {"i": -math.inf}

    async def events(self):
        self.emit("bad", {"x": math.nan})
        self.emit("good", {"x": 1})
        return True
"""


def scores_entry(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "scores_plugin.py").write_text(SCORES_PLUGIN)
    target = {"provider": "local", "entrypoint": "scores_plugin:Scores", "path": str(tmp_path)}
    methods = {"ok": {}, "nan": {}, "chunks": {}, "events": {}}
    return {"id": "scores", "version": "1.0.0", "target": target, "methods": methods}


def assert_not_json(error: dict[str, Any]) -> None:
    assert error["type"] == "provider_error", error
    assert error["message"] == "the plugin's result is not JSON: nan is not a JSON number"
    assert error["retryable"] is False


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
async def test_over_http_a_non_finite_result_is_a_provider_error(
    tmp_path: Path, lane: bool
) -> None:
    settings = GatewaySettings(port=0, call_lane=lane)
    async with (
        running_gateway(scores_entry(tmp_path), settings=settings) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        url = f"{server.url}/v1/plugins/scores/methods"
        async with session.post(f"{url}/nan", json={}) as answer:
            body = orjson.loads(await answer.read())
        assert answer.status == 502, body
        assert_not_json(body["error"])
        async with session.post(f"{url}/ok", json={}) as answer:
            assert orjson.loads(await answer.read())["result"] == {"ratio": 0.5, "missing": None}


async def test_over_grpc_a_non_finite_result_or_chunk_ends_the_call_as_provider_error(
    tmp_path: Path,
) -> None:
    settings = GatewaySettings(port=0, grpc_port=0)
    async with (
        running_gateway(scores_entry(tmp_path), settings=settings) as (_, server),
        grpc.aio.insecure_channel(server.grpc.address) as channel,  # type: ignore[union-attr]
    ):
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)

        def call(method: str) -> Any:
            return gateway_pb2.GatewayCall(plugin="scores", method=method, params_json=b"{}")

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gateway.Call(call("nan"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (
            refused.value.details() == "the plugin's result is not JSON: nan is not a JSON number"
        )
        trailers = dict(refused.value.trailing_metadata() or ())
        assert trailers["error-type"] == "provider_error"

        got: list[Any] = []

        async def read_the_stream() -> None:
            async for item in gateway.Stream(call("chunks")):
                got.append(orjson.loads(item.chunk_json))

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await read_the_stream()
        assert got == [{"i": 0}]
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "-inf is not a JSON number" in (refused.value.details() or "")
        reply = await gateway.Call(call("ok"))
        assert orjson.loads(reply.result_json) == {"ratio": 0.5, "missing": None}


async def test_an_event_with_non_finite_data_is_dropped_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatcher.gateway")
    async with (
        running_gateway(scores_entry(tmp_path)) as (_, server),
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.url}/v1/events?plugin=scores") as ws,
    ):
        assert (await ws.receive_json(loads=orjson.loads))["type"] == "subscribed"
        async with session.post(f"{server.url}/v1/plugins/scores/methods/events", json={}):
            pass
        event = await ws.receive_json(loads=orjson.loads, timeout=10)
    assert (event["event"], event["data"], event["id"]) == ("good", {"x": 1}, 1)
    (said,) = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert said == "event scores@1.0.0/bad dropped: its data is not JSON: nan is not a JSON number"


def test_dispatcher_call_prints_what_json_cannot_carry_as_the_call_s_error(tmp_path: Path) -> None:
    entry = scores_entry(tmp_path) | {"methods": {"nan": {}, "a_set": {}, "ok": {}}}
    (tmp_path / "scores_plugin.py").write_text(
        SCORES_PLUGIN + "\n    async def a_set(self):\n        return {1, 2}\n"
    )
    (tmp_path / "plugins.json").write_text(json.dumps({"version": 1, "plugins": [entry]}))

    def call(method: str) -> subprocess.CompletedProcess[str]:
        dispatcher = Path(sys.executable).with_name("dispatcher")
        return subprocess.run(
            (dispatcher, "-m", tmp_path / "plugins.json", "call", f"scores.{method}"),
            capture_output=True,
            text=True,
            timeout=60,
        )

    for method, reason in (("nan", "nan is not a JSON number"), ("a_set", "not JSON serializable")):
        done = call(method)
        assert (done.returncode, done.stdout) == (1, ""), done.stderr
        error = json.loads(done.stderr)["error"]
        assert error["type"] == "provider_error"
        assert error["message"].startswith("the plugin's result is not JSON: "), error
        assert reason in error["message"], error
    done = call("ok")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"ratio": 0.5, "missing": None}


async def test_a_keyed_call_keeps_the_plugin_s_error_when_its_details_are_no_json(
    tmp_path: Path,
) -> None:
    """The idempotency record of an error whose details JSON cannot carry: before, storing
    it raised, and the caller got InvalidParams about params instead of the plugin's error
    (and its duplicate ran the method again)."""
    (tmp_path / "odd_plugin.py").write_text(
        "import math\n"
        "from linchkit_plugin import Plugin\n"
        "from linchkit_plugin.errors import PluginError\n\n"
        "class Odd(Plugin):\n"
        "    runs = 0\n\n"
        "    async def refuse(self):\n"
        "        Odd.runs += 1\n"
        "        details = {'balance': math.nan, 'runs': Odd.runs}\n"
        "        raise PluginError('no such account', remote_type='NoAccount', details=details)\n"
    )
    target = {"provider": "local", "entrypoint": "odd_plugin:Odd", "path": str(tmp_path)}
    entry = {"id": "odd", "version": "1.0.0", "target": target, "methods": {"refuse": {}}}
    async with Dispatcher(manifest(entry)) as dispatcher:
        for _ in range(2):  # the duplicate is answered the first call's outcome
            with pytest.raises(PluginError, match="no such account") as refused:
                await dispatcher.call("odd", "refuse", {}, idempotency_key="order-17")
            assert refused.value.remote_type == "NoAccount"
        # What a duplicate gets is the record: the plugin ran once, details left out.
        assert refused.value.details == {}
