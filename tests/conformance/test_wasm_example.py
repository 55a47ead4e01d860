"""The Go SDK's example plugin built for the wasm provider (sdk/go/dist/example-plugin.wasm,
made by sdk/go/build.sh), held to the cases of the conformance suite that apply.

Apply: unary calls, params checks, the plugin's own typed errors, deadlines, unknown
methods, config, health, batches, concurrency. Do not apply: streams (``count`` answers
as its list; a wasm call returns once), plugin events and host events (a call has no
channel back but its output), Describe and gRPC reflection (no gRPC).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from dispatcher import (
    DeadlineExceeded,
    Dispatcher,
    InvalidParams,
    MethodNotFound,
    PluginError,
    parse_manifest,
)
from providers.invocation import Invocation, new_request_id
from tests.conftest import ROOT

MODULE = ROOT / "sdk" / "go" / "dist" / "example-plugin.wasm"
CONFIG = {"region": "eu", "limits": {"max": 3}, "tags": ["a", "b"]}
METHODS = ("echo", "digest", "fail", "sleep", "count", "config")


def digest(data: str, rounds: int) -> str:
    value = data.encode()
    for _ in range(rounds):
        value = hashlib.sha256(value).digest()
    return value.hex()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def example() -> AsyncIterator[Dispatcher]:
    if not MODULE.exists():
        pytest.fail(f"{MODULE} is missing: run sdk/go/build.sh (make sdks) and fix that build")
    manifest = parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "example",
                    "version": "1.0.0",
                    "config": CONFIG,
                    "target": {
                        "provider": "wasm",
                        "module": str(MODULE),
                        "sha256": hashlib.sha256(MODULE.read_bytes()).hexdigest(),
                    },
                    "methods": {name: {} for name in METHODS},
                }
            ],
        }
    )
    async with Dispatcher(manifest) as dispatcher:
        yield dispatcher


pytestmark = [pytest.mark.toolchain, pytest.mark.asyncio(loop_scope="module")]


async def call(example: Dispatcher, method: str, params: Any, timeout: float = 10.0) -> Any:
    return await example.call("example", method, params, timeout=timeout)


@pytest.mark.parametrize(
    "params",
    [{"a": [1, {"b": None}], "c": "ü"}, [1, "two", 3.5], "text", 7, 2**53, True, {}, []],
)
async def test_echo_returns_the_params_unchanged(example: Dispatcher, params: Any) -> None:
    assert await call(example, "echo", params) == params


async def test_digest_hashes_rounds_times(example: Dispatcher) -> None:
    assert await call(example, "digest", {"data": "abc", "rounds": 1}) == digest("abc", 1)
    assert await call(example, "digest", {"data": "ünï", "rounds": 1000}) == digest("ünï", 1000)


@pytest.mark.parametrize(
    "params",
    [{"data": "abc", "rounds": "many"}, {"data": "abc"}, {"rounds": 3}, {"data": 5, "rounds": 1}],
)
async def test_digest_with_wrong_params_is_invalid_params(
    example: Dispatcher, params: dict[str, Any]
) -> None:
    with pytest.raises(InvalidParams):
        await call(example, "digest", params)


async def test_fail_is_the_plugins_own_error(example: Dispatcher) -> None:
    with pytest.raises(PluginError) as caught:
        await call(example, "fail", {"message": "card declined"})
    assert caught.value.remote_type == "ExampleFailure"
    assert caught.value.message == "card declined"
    assert caught.value.retryable is False


async def test_sleep_answers_after_sleeping(example: Dispatcher) -> None:
    started = time.perf_counter()
    assert await call(example, "sleep", {"ms": 50}) == {"slept_ms": 50}
    assert time.perf_counter() - started >= 0.045


async def test_sleep_past_the_deadline_is_deadline_exceeded_on_time(example: Dispatcher) -> None:
    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        await call(example, "sleep", {"ms": 5_000}, timeout=0.3)
    assert time.perf_counter() - started < 2.0
    assert await call(example, "echo", "still serving") == "still serving"


async def test_count_as_a_unary_call_is_the_list_of_chunks(example: Dispatcher) -> None:
    assert await call(example, "count", {"n": 3}) == [{"i": 0}, {"i": 1}, {"i": 2}]


@pytest.mark.parametrize("n", [1_000_001, 2**40, 2**62])
async def test_count_past_its_bound_is_invalid_params_naming_it(
    example: Dispatcher, n: int
) -> None:
    # The native examples' bound: before it, 2**40 trapped the module (a ProviderError
    # quoting a wasm backtrace) and 1,000,001 grew it past memory_mb.
    with pytest.raises(InvalidParams, match=f"n must be at most 1000000, got {n}"):
        await call(example, "count", {"n": n})
    assert await call(example, "count", {"n": 1}) == [{"i": 0}]


async def test_config_is_what_the_manifest_gave(example: Dispatcher) -> None:
    assert await call(example, "config", {}) == CONFIG


async def test_an_unknown_method_is_method_not_found(example: Dispatcher) -> None:
    with pytest.raises(MethodNotFound):
        await call(example, "no_such_method", {})


async def test_health_is_serving(example: Dispatcher) -> None:
    target = example.manifest.plugins[0].target
    assert (await example.providers["wasm"].health(target)).ok


async def test_a_batch_answers_each_item_in_order(example: Dispatcher) -> None:
    target = example.manifest.plugins[0].target
    provider = example.providers["wasm"]
    deadline = asyncio.get_running_loop().time() + 10

    def invocation(method: str, params: Any) -> Invocation:
        return Invocation("example", "1.0.0", method, params, deadline, new_request_id())

    outcomes = await provider.invoke_batch(
        target,
        [
            invocation("echo", {"a": 1}),
            invocation("fail", {"message": "item two"}),
            invocation("digest", {"data": "x", "rounds": 2}),
            invocation("no_such_method", {}),
            invocation("count", {"n": 2}),
        ],
    )
    assert [outcome.ok for outcome in outcomes] == [True, False, True, False, True]
    assert outcomes[0].result == {"a": 1}
    assert isinstance(outcomes[1].error, PluginError)
    assert outcomes[1].error.remote_type == "ExampleFailure"
    assert outcomes[2].result == digest("x", 2)
    assert isinstance(outcomes[3].error, MethodNotFound)
    assert outcomes[4].result == [{"i": 0}, {"i": 1}]


async def test_concurrent_calls_all_answer(example: Dispatcher) -> None:
    results = await asyncio.gather(*(call(example, "echo", {"i": i}) for i in range(64)))
    assert results == [{"i": i} for i in range(64)]
