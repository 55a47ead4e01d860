"""The conformance suite: docs/protocol.md's example-plugin table, for every language, two ways.

Each test runs once per (language, mode) of ``conftest.example``. What a case checks is
only what the protocol promises, so every SDK is held to the same contract.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

import pytest

from dispatcher import (
    DeadlineExceeded,
    InvalidParams,
    Invocation,
    MethodNotFound,
    PluginError,
    ProviderError,
)
from providers.invocation import Outcome, new_request_id
from tests.conformance.conftest import CONFIG, Example

pytestmark = pytest.mark.asyncio(loop_scope="module")


def digest(data: str, rounds: int) -> str:
    value = data.encode()
    for _ in range(rounds):
        value = hashlib.sha256(value).digest()
    return value.hex()


async def call(example: Example, method: str, params: Any = None, **options: Any) -> Any:
    return await example.dispatcher.call(example.plugin, method, params, **options)


async def batch(example: Example, *calls: tuple[str, Any]) -> list[Outcome[Any]]:
    """The outcomes of ``calls`` (method, params), sent to the plugin as one batch."""
    target = example.target()
    provider = example.dispatcher.providers[target.provider]
    deadline = time.monotonic() + 10
    invocations = [
        Invocation("example", "1.0.0", method, params, deadline, new_request_id())
        for method, params in calls
    ]
    return await provider.invoke_batch(target, invocations)


async def test_describe_names_the_plugin_and_its_methods(example: Example) -> None:
    info = await example.connection().describe_plugin(timeout=10)
    assert (info["id"], info["version"], info["protocol_version"]) == ("example", "1.0.0", 1)
    assert info["runtime"] == example.language
    expected = {"echo", "digest", "fail", "sleep", "count", "emit", "config", "non_finite"}
    expected.add("not_unicode")
    assert expected <= set(info["methods"])
    assert info["methods"]["count"]["streaming"] is True
    assert info["methods"]["echo"]["streaming"] is False


@pytest.mark.parametrize(
    "params",
    [
        {"text": "hi", "n": 1, "nested": {"list": [1, 2.5, None, True]}},
        [1, "two", {"three": 3}],
        "a string with unicode: ünïcødé ✓",
        42,
        2**60,  # beyond a double's exact integers: JSON bytes keep it exact
        True,
        {},
        [],
    ],
    ids=["object", "array", "string", "int", "int64", "bool", "empty-object", "empty-array"],
)
async def test_echo_returns_the_params_unchanged(example: Example, params: Any) -> None:
    assert await call(example, "echo", params) == params


async def test_a_large_envelope_goes_compressed_both_ways(example: Example) -> None:
    """Over ``provider: grpc`` a call over the threshold is sent in gRPC's gzip; every SDK's
    server must take it (and answers in gzip too) rather than refuse it as UNIMPLEMENTED."""
    params = {"rows": [{"id": index, "name": f"row-{index}"} for index in range(8_000)]}
    assert await call(example, "echo", params) == params
    if example.mode == "service":
        connection = example.connection()
        assert connection._compress_min_bytes is not None, "the plugin refused gzip"


async def test_params_of_5_mb_echo_back_intact(example: Example) -> None:
    """Past grpc's default 4 MiB, well within the 64 MiB the dispatcher and every SDK take
    and send (docs/protocol.md, "gRPC binding")."""
    if example.mode not in ("service", "subprocess"):
        pytest.skip("the gRPC binding's cap")
    params = {"data": "x" * 5_000_000, "last": "ü"}
    assert await call(example, "echo", params) == params


async def test_params_over_64_mib_are_invalid_params_and_the_plugin_serves_on(
    example: Example,
) -> None:
    """The dispatcher's channel refuses to send them: the same answer for every language,
    the caller's InvalidParams (not a rate limit, not retryable)."""
    if example.mode != "service":
        pytest.skip("one over-limit call per language")
    with pytest.raises(InvalidParams) as caught:
        await call(example, "echo", "x" * (64 << 20))
    assert caught.value.retryable is False
    assert caught.value.details == {"reason": "too_large"}
    assert await call(example, "echo", {"still": "serving"}) == {"still": "serving"}


async def test_digest_hashes_rounds_times(example: Example) -> None:
    assert await call(example, "digest", {"data": "abc", "rounds": 1}) == digest("abc", 1)
    assert await call(example, "digest", {"data": "ünï", "rounds": 1000}) == digest("ünï", 1000)


@pytest.mark.parametrize(
    "params",
    [{"data": "abc", "rounds": "many"}, {"data": "abc"}, {"rounds": 3}, {"data": 5, "rounds": 1}],
    ids=["rounds-not-int", "no-rounds", "no-data", "data-not-string"],
)
async def test_digest_with_wrong_params_is_invalid_params(
    example: Example, params: dict[str, Any]
) -> None:
    with pytest.raises(InvalidParams):
        await call(example, "digest", params)


async def test_fail_is_the_plugins_own_error(example: Example) -> None:
    with pytest.raises(PluginError) as caught:
        await call(example, "fail", {"message": "card declined"})
    assert caught.value.remote_type == "ExampleFailure"
    assert caught.value.message == "card declined"
    assert caught.value.retryable is False


async def test_sleep_answers_after_sleeping(example: Example) -> None:
    started = time.perf_counter()
    assert await call(example, "sleep", {"ms": 50}) == {"slept_ms": 50}
    assert time.perf_counter() - started >= 0.045


async def test_sleep_past_the_deadline_is_deadline_exceeded_on_time(example: Example) -> None:
    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        await call(example, "sleep", {"ms": 5_000}, timeout=0.3)
    assert time.perf_counter() - started < 2.0
    assert await call(example, "echo", "still serving") == "still serving"


async def test_count_as_a_unary_call_is_the_list_of_chunks(example: Example) -> None:
    assert await call(example, "count", {"n": 3}) == [{"i": 0}, {"i": 1}, {"i": 2}]


async def test_count_streams_its_chunks(example: Example) -> None:
    chunks = [c async for c in example.dispatcher.stream("example", "count", {"n": 5})]
    assert chunks == [{"i": i} for i in range(5)]
    assert [c async for c in example.dispatcher.stream("example", "count", {"n": 0})] == []


async def test_count_stream_with_wrong_params_is_invalid_params(example: Example) -> None:
    with pytest.raises(InvalidParams):
        async for _ in example.dispatcher.stream("example", "count", {}):
            pass
    with pytest.raises(InvalidParams):
        await call(example, "count", {"n": "three"})


#: The example's bounds (docs/protocol.md, "The example plugin"): a caller's pad or n past
#: them is refused before the plugin allocates or sends anything.
MAX_PAD = 64 << 20
MAX_COUNT = 1_000_000
TERABYTE = 2**40


async def no_chunk(example: Example, method: str, params: Any) -> None:
    """``method`` called as a stream, failing the test on a chunk: a refusal comes first."""
    stream = example.dispatcher.stream("example", method, params)
    try:
        async for chunk in stream:
            pytest.fail(f"{method} sent a chunk before refusing: {chunk!r:.60}")
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def refusal(example: Example, method: str, params: Any, *, streamed: bool) -> str:
    """The message of the InvalidParams ``method`` answers ``params`` with, called as a
    stream or unary."""
    called = no_chunk(example, method, params) if streamed else call(example, method, params)
    with pytest.raises(InvalidParams) as caught:
        await called
    return str(caught.value)


@pytest.mark.parametrize(
    ("method", "params", "streamed", "bound", "value"),
    [
        ("count", {"n": 1, "pad": TERABYTE}, False, MAX_PAD, TERABYTE),
        ("count", {"n": 1, "pad": TERABYTE}, True, MAX_PAD, TERABYTE),
        ("emit", {"name": "large", "pad": TERABYTE}, False, MAX_PAD, TERABYTE),
        ("emit", {"name": "large", "pad": MAX_PAD + 1}, False, MAX_PAD, MAX_PAD + 1),
        ("count", {"n": TERABYTE}, False, MAX_COUNT, TERABYTE),
        ("count", {"n": TERABYTE}, True, MAX_COUNT, TERABYTE),
        ("count", {"n": MAX_COUNT + 1}, False, MAX_COUNT, MAX_COUNT + 1),
    ],
    ids=[
        "count-pad-2**40",
        "streamed-count-pad-2**40",
        "emit-pad-2**40",
        "emit-pad-past-64-mib",
        "count-n-2**40",
        "streamed-count-n-2**40",
        "count-n-past-a-million",
    ],
)
async def test_a_pad_or_n_past_its_bound_is_invalid_params_and_the_plugin_serves_on(
    example: Example,
    method: str,
    params: dict[str, Any],
    streamed: bool,
    bound: int,
    value: int,
) -> None:
    """A terabyte of padding ended the Rust and Go plugins (an aborted allocation, Go's
    runtime out of memory) and was Python's MemoryError, Node's RangeError; a unary count
    of 2**40 chunks grew Python's and Node's memory past the call's deadline. A caller gets
    InvalidParams naming the bound and its value, and the plugin serves on."""
    process = example.process()
    message = await refusal(example, method, params, streamed=streamed)
    assert str(bound) in message and str(value) in message, message
    assert await call(example, "echo", {"still": "serving"}) == {"still": "serving"}
    assert example.process() is process and process.returncode is None, "the plugin died"


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("count", {"n": 1, "pad": 2**64 - 1}),
        ("emit", {"name": "large", "pad": 1e300}),
        ("count", {"n": 2**64 - 1}),
        ("count", {"n": 1e300}),
    ],
    ids=["count-pad-2**64-1", "emit-pad-1e300", "count-n-2**64-1", "count-n-1e300"],
)
async def test_a_pad_or_n_past_every_integer_type_is_invalid_params(
    example: Example, method: str, params: dict[str, Any]
) -> None:
    """Past a signed 64-bit integer (2**64-1 is the most the host's JSON sends), or no
    integer at all: refused, never wrapped into a small number nor a crash."""
    process = example.process()
    await refusal(example, method, params, streamed=False)
    assert await call(example, "echo", "still serving") == "still serving"
    assert example.process() is process and process.returncode is None, "the plugin died"


async def test_a_stream_can_be_left_early(example: Example) -> None:
    stream = example.dispatcher.stream("example", "count", {"n": 10_000})
    async for chunk in stream:
        assert chunk == {"i": 0}
        break
    await stream.aclose()  # type: ignore[attr-defined]
    assert await call(example, "echo", 1) == 1


async def test_emit_reaches_the_hosts_handlers(example: Example) -> None:
    # The Events stream opens with the dispatcher; a ping/pong first proves it is live.
    await example.dispatcher.publish("example", "ping", {"seq": 1})
    assert await example.next_event("pong") == {"seq": 1}
    assert await call(example, "emit", {"name": "order.paid", "data": {"id": 7}}) is True
    assert await example.next_event("order.paid") == {"id": 7}


async def test_host_ping_is_answered_by_pong_with_the_same_data(example: Example) -> None:
    payload = {"nested": [1, {"x": "y"}], "n": 2**40}
    await example.dispatcher.publish("example", "ping", payload)
    assert await example.next_event("pong") == payload


async def test_a_failing_host_event_handler_reaches_the_hosts_log_as_an_error(
    example: Example, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK's own stderr line says its level, so the host logs an SDK error at ERROR,
    not at INFO (providers/subprocess/levels.py); the plugin goes on."""
    if example.mode != "subprocess":
        pytest.skip("only a subprocess plugin's stderr reaches the host's log")
    caplog.set_level(logging.DEBUG, logger="dispatcher.plugin.example")
    message = f"the ledger of {example.language} is gone"
    before = len(caplog.records)
    await example.dispatcher.publish("example", "fail", {"message": message})
    await example.dispatcher.publish("example", "ping", {"after": "fail"})
    assert await example.next_event("pong") == {"after": "fail"}
    deadline = time.monotonic() + 10
    while not any(message in r.getMessage() for r in caplog.records[before:]):
        assert time.monotonic() < deadline, "the failure reached no log within 10 s"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # the rest of a record written as several lines, if any
    # Every line of the failure (a stack trace too) at ERROR: one line a record.
    logged = [r for r in caplog.records[before:] if r.name == "dispatcher.plugin.example"]
    assert {r.levelname for r in logged} == {"ERROR"}, [
        (r.levelname, r.getMessage()) for r in logged
    ]
    assert any(message in r.getMessage() for r in logged)


async def test_config_is_what_init_received(example: Example) -> None:
    assert await call(example, "config", {}) == CONFIG


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
async def test_a_result_json_cannot_carry_is_a_provider_error_and_the_plugin_serves_on(
    example: Example, value: str
) -> None:
    """JSON has no NaN or infinity. Until 2026-12-07 the Python (HTTP, gRPC), Rust and
    TypeScript SDKs sent one as ``null``, a different answer and no word of it; Java's and
    Go's answered the call a ``PluginError`` of their JSON library's (Java's with Gson's
    advice to configure Gson), and a pre-built JSON value holding one went out as a bare
    ``NaN`` token, which no host can read."""
    with pytest.raises(ProviderError) as refused:
        await call(example, "non_finite", {"value": value})
    assert str(refused.value).startswith("the plugin's result is not JSON: "), refused.value
    assert not refused.value.retryable
    assert await call(example, "echo", {"after": value}) == {"after": value}


async def test_a_string_that_is_not_unicode_is_a_provider_error_and_the_plugin_serves_on(
    example: Example,
) -> None:
    """JSON text is UTF-8, and a lone surrogate escape stands for no character. Until
    2026-12-08 Go's SDK sent U+FFFD for bytes that are not UTF-8 and Java's '?' for a lone
    surrogate, each a different answer without a word; TypeScript's and Rust's (a raw JSON
    value) sent an escape the host could not read ("not a response envelope", the raw
    bytes); Python's refused it in orjson's words. ``not_unicode`` builds its string as an
    author of that language does (half an emoji cut by a UTF-16 index, Latin-1 bytes)."""
    with pytest.raises(ProviderError) as refused:
        await call(example, "not_unicode", {})
    assert str(refused.value) == (
        "the plugin's result is not JSON: a string is not valid Unicode "
        + ("(bytes that are not UTF-8)" if example.language == "go" else "(a lone surrogate)")
    ), refused.value
    assert not refused.value.retryable
    text = {"text": "smile 😀 ünïcødé \\ud83d \ufffd"}
    assert await call(example, "echo", text) == text


async def test_a_batch_refuses_only_the_item_json_cannot_carry(example: Example) -> None:
    outcomes = await batch(
        example, ("non_finite", {"value": "nan"}), ("echo", [1]), ("not_unicode", {})
    )
    assert isinstance(outcomes[0].error, ProviderError), outcomes[0]
    assert "result is not JSON" in str(outcomes[0].error)
    assert outcomes[1].result == [1]
    assert isinstance(outcomes[2].error, ProviderError), outcomes[2]
    assert "is not JSON: a string is not valid Unicode" in str(outcomes[2].error)


async def test_non_finite_with_a_value_it_does_not_name_is_invalid_params(
    example: Example,
) -> None:
    for params in ({"value": "NaN!"}, {}, {"value": ["nan"]}):
        with pytest.raises(InvalidParams, match="value"):
            await call(example, "non_finite", params)


async def test_an_unknown_method_is_method_not_found(example: Example) -> None:
    with pytest.raises(MethodNotFound):
        await call(example, "no_such_method", {})


async def test_health_is_serving(example: Example) -> None:
    # An inbound fleet also reports its source (the connections): the instance is the test.
    (report,) = [r for r in await example.dispatcher.health() if r.state != "source"]
    assert report.health.status == "serving", report.health.detail
    connection = example.connection()
    overall = await connection.health(service="")
    assert overall.status == "serving", overall.detail


async def test_a_batch_answers_each_item_in_order(example: Example) -> None:
    outcomes = await batch(
        example,
        ("echo", {"a": 1}),
        ("fail", {"message": "item two"}),
        ("digest", {"data": "x", "rounds": 2}),
        ("no_such_method", {}),
        ("count", {"n": 2}),
    )
    assert [outcome.ok for outcome in outcomes] == [True, False, True, False, True]
    assert outcomes[0].result == {"a": 1}
    assert isinstance(outcomes[1].error, PluginError)
    assert outcomes[1].error.remote_type == "ExampleFailure"
    assert outcomes[2].result == digest("x", 2)
    assert isinstance(outcomes[3].error, MethodNotFound)
    assert outcomes[4].result == [{"i": 0}, {"i": 1}]


async def test_concurrent_calls_all_answer(example: Example) -> None:
    results = await asyncio.gather(*(call(example, "echo", {"i": i}) for i in range(64)))
    assert results == [{"i": i} for i in range(64)]
