"""``lambda_handler``: the plugin class as a Lambda handler, called in-process.

The same handler runs in the real Lambda runtime in ``test_lambda_provider.py``; here its
contract is checked directly and fast, with a context object shaped like awslambdaric's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from linchkit_plugin.aws_lambda import CONFIG_ENVIRONMENT_VARIABLE, LambdaPlugin, lambda_handler


@dataclass
class ClientContext:
    custom: dict[str, Any] | None = None


@dataclass
class Context:
    """The attributes awslambdaric's LambdaContext has that the handler reads."""

    remaining_ms: int = 30_000
    aws_request_id: str = "aws-req-1"
    client_context: ClientContext | None = field(default_factory=ClientContext)

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


class Recorder:
    """Counts its lifecycle, so a test can see init/start run once per cold start."""

    opened = 0

    async def init(self, config: dict[str, Any]) -> None:
        type(self).opened += 1
        self.config = config

    async def start(self) -> None:
        self.started = True

    async def config_of(self) -> dict[str, Any]:
        return self.config

    async def context_of(self) -> dict[str, Any]:
        from linchkit_plugin import current_context

        return current_context()

    async def slow(self, seconds: float) -> float:
        import asyncio

        await asyncio.sleep(seconds)
        return seconds

    def fail(self) -> None:
        raise LookupError("nothing here")


def request(method: str, params: Any = None, **context: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "plugin": "recorder",
        "method": method,
        "params": params if params is not None else {},
        "context": {"request_id": "r-1", "deadline_ms": 5000, **context},
    }


@pytest.fixture
def handler() -> Iterator[LambdaPlugin]:
    plugin = lambda_handler(Recorder, config={"answer": 42})
    assert isinstance(plugin, LambdaPlugin)
    yield plugin
    plugin.close()


def test_init_and_start_run_once_per_cold_start(handler: LambdaPlugin) -> None:
    before = Recorder.opened
    for _ in range(3):
        assert handler(request("config_of"), Context()) == {"ok": True, "result": {"answer": 42}}
    assert Recorder.opened == before
    assert handler.invocations == 3


def test_the_config_comes_from_the_environment_when_not_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CONFIG_ENVIRONMENT_VARIABLE, orjson.dumps({"from": "env"}).decode())
    plugin = lambda_handler(Recorder)
    try:
        assert plugin(request("config_of"), Context())["result"] == {"from": "env"}
    finally:
        plugin.close()  # type: ignore[attr-defined]


def test_an_exception_is_an_error_envelope_not_a_function_error(handler: LambdaPlugin) -> None:
    answer = handler(request("fail"), Context())
    assert answer == {
        "ok": False,
        "error": {"type": "LookupError", "message": "nothing here", "retryable": False},
    }


def test_unknown_methods_and_bad_envelopes_answer_typed_errors(handler: LambdaPlugin) -> None:
    assert handler(request("nope"), Context())["error"]["type"] == "method_not_found"
    assert handler({"v": 9, "method": "x"}, Context())["error"]["type"] == "provider_error"
    assert handler(request("slow", {"nope": 1}), Context())["error"]["type"] == "invalid_params"


def test_the_context_merges_the_envelope_over_the_client_context(handler: LambdaPlugin) -> None:
    context = Context(client_context=ClientContext({"caller": "cc", "tenant": "t1"}))
    result = handler(request("context_of", caller="alice"), context)["result"]
    assert result["caller"] == "alice"  # the envelope wins
    assert result["tenant"] == "t1"  # what only the client context has is kept
    assert result["lambda_request_id"] == "aws-req-1"


def test_the_deadline_is_the_sooner_of_the_envelope_and_lambda(handler: LambdaPlugin) -> None:
    # Lambda has 300 ms left, the envelope 5 s: the plugin gives up before Lambda kills it.
    answer = handler(request("slow", {"seconds": 2}), Context(remaining_ms=300))
    assert answer["error"]["type"] == "deadline_exceeded"
    answer = handler(request("slow", {"seconds": 2}, deadline_ms=200), Context())
    assert answer["error"]["type"] == "deadline_exceeded"


def test_a_batch_answers_each_item_in_order(handler: LambdaPlugin) -> None:
    event = {"batch": [request("config_of"), request("fail"), {"not": "an envelope"}]}
    answer = handler(event, Context())
    results = answer["results"]
    assert results[0] == {"ok": True, "result": {"answer": 42}}
    assert results[1]["error"]["type"] == "LookupError"
    assert results[2]["error"]["type"] == "provider_error"
    assert handler({"batch": "nope"}, Context())["ok"] is False
