"""The Dispatcher API: resolution, versions, call_many, batches, and leaving nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from dispatcher import (
    Call,
    DeadlineExceeded,
    Dispatcher,
    InvalidParams,
    Invocation,
    MethodNotFound,
    PluginError,
    PluginNotFound,
)
from providers.http import HttpProvider, HttpTarget
from providers.invocation import new_request_id
from tests.conftest import LOCAL_TARGET, ROOT, echo_plugin, manifest

ENVELOPE_SCHEMA = json.loads((ROOT / "proto" / "envelope.schema.json").read_text())


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_unknown_plugin_and_method_name_what_exists() -> None:
    async with Dispatcher(manifest(echo_plugin("echo", LOCAL_TARGET))) as dispatcher:
        with pytest.raises(PluginNotFound, match=r"known: echo@1\.0\.0"):
            await dispatcher.call("ehco", "say", {"text": "x"})
        with pytest.raises(MethodNotFound, match="it has: digest, say, sleep, withdraw"):
            await dispatcher.call("echo", "shout", {"text": "x"})
        # The plugin's class has ``fail``; the manifest does not list it, and says so.
        with pytest.raises(MethodNotFound, match="no method 'fail' in the manifest; it has"):
            await dispatcher.call("echo", "fail", {"message": "x"})


async def test_calls_outside_the_context_are_refused_clearly() -> None:
    dispatcher = Dispatcher(manifest(echo_plugin("echo", LOCAL_TARGET)))
    with pytest.raises(PluginNotFound, match="inside 'async with'"):
        await dispatcher.call("echo", "say", {"text": "x"})


async def test_health_refuses_a_timeout_that_is_no_deadline() -> None:
    async with Dispatcher(manifest(echo_plugin("echo", LOCAL_TARGET))) as dispatcher:
        for bad in (float("nan"), float("inf"), "5", None, 10**9):
            with pytest.raises(InvalidParams, match="timeout must be a number"):
                await dispatcher.health(timeout=bad)  # type: ignore[arg-type]
        [report] = await dispatcher.health(timeout=2.0)
        assert report.health.status == "serving"


async def test_wait_at_most_shortens_a_calls_deadline_and_never_lengthens_it() -> None:
    """How long the caller waits (a gRPC client's deadline): sooner than the method's
    ``timeout_ms`` or ``timeout``, it is the deadline; later, even past any deadline the
    dispatcher takes, it changes nothing."""
    entry = echo_plugin("echo", LOCAL_TARGET, defaults={"timeout_ms": 100})
    async with Dispatcher(manifest(entry)) as dispatcher:
        assert await dispatcher.call("echo", "say", {"text": "x"}, wait_at_most=1e9)
        for wait_at_most in (1e9, 60.0):
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await dispatcher.call("echo", "sleep", {"seconds": 1.0}, wait_at_most=wait_at_most)
            assert time.monotonic() - started < 0.9  # the method's 100 ms
        slept = await dispatcher.call(
            "echo", "sleep", {"seconds": 0.2}, timeout=5.0, wait_at_most=1e9
        )
        assert slept >= 0.2
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await dispatcher.call("echo", "sleep", {"seconds": 1.0}, timeout=5.0, wait_at_most=0.1)
        assert time.monotonic() - started < 0.9


async def test_the_latest_version_answers_unless_one_is_named() -> None:
    old = echo_plugin("echo", LOCAL_TARGET, version="1.2.0", config={"greeting": "old"})
    new = echo_plugin("echo", LOCAL_TARGET, version="1.10.0", config={"greeting": "new"})
    pre = echo_plugin("echo", LOCAL_TARGET, version="1.10.0-rc.1", config={"greeting": "pre"})
    async with Dispatcher(manifest(old, new, pre)) as dispatcher:
        latest = await dispatcher.call("echo", "say", {"text": "x"})
        pinned = await dispatcher.call("echo", "say", {"text": "x"}, version="1.2.0")
        with pytest.raises(PluginNotFound):
            await dispatcher.call("echo", "say", {"text": "x"}, version="9.9.9")
    assert (latest["greeting"], pinned["greeting"]) == ("new", "old")


async def test_params_schema_is_checked_before_the_target_is_called() -> None:
    plugin = echo_plugin("echo", LOCAL_TARGET)
    plugin["methods"]["say"] = {
        "params_schema": {
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": 3}},
            "required": ["text"],
        }
    }
    async with Dispatcher(manifest(plugin)) as dispatcher:
        with pytest.raises(InvalidParams, match=r"params\['text'\]: 'toolong' is too long"):
            await dispatcher.call("echo", "say", {"text": "toolong"})
        assert (await dispatcher.call("echo", "say", {"text": "ok"}))["text"] == "ok"
        # The refused value is quoted, but not whole: a 120 KB list came back as a 120 KB
        # message (to a gateway's caller, into logs).
        with pytest.raises(InvalidParams) as refused:
            await dispatcher.call("echo", "say", {"text": list(range(30_000))})
        message = refused.value.message
        assert message.startswith("params['text']: [0, 1, 2") and len(message) < 1100, message
        assert message.endswith("characters in all)"), message[-80:]


async def test_call_many_keeps_order_and_reports_every_outcome(echo_url: str) -> None:
    plugins = manifest(
        echo_plugin("local", LOCAL_TARGET),
        echo_plugin("remote", {"provider": "http", "url": echo_url}),
    )
    async with Dispatcher(plugins) as dispatcher:
        calls: list[Any] = [
            ("local", "say", {"text": "a"}),
            Call("remote", "say", {"text": "b"}, caller="bob"),
            ("remote", "withdraw", {"amount": 1000}),
        ]
        results = await dispatcher.call_many(calls, return_exceptions=True)
        with pytest.raises(PluginError):
            await dispatcher.call_many(calls)
    assert results[0]["text"] == "a"
    assert results[1] == {"text": "b", "greeting": "from http", "caller": "bob"}
    assert isinstance(results[2], PluginError)
    assert results[2].remote_type == "InsufficientFunds"


async def test_a_native_batch_fails_only_its_failing_items(echo_url: str) -> None:
    async with HttpProvider() as provider:
        target = HttpTarget(provider="http", url=echo_url)  # type: ignore[arg-type]

        def invocation(method: str, params: Any) -> Invocation:
            deadline = time.monotonic() + 5
            return Invocation("echo", "1.0.0", method, params, deadline, new_request_id())

        outcomes = await provider.invoke_batch(
            target,
            [
                invocation("say", {"text": "one"}),
                invocation("withdraw", {"amount": 500}),
                invocation("say", {"text": "three"}),
                invocation("nope", {}),
            ],
        )
    assert [outcome.ok for outcome in outcomes] == [True, False, True, False]
    assert outcomes[0].unwrap()["text"] == "one"
    assert isinstance(outcomes[1].error, PluginError)
    assert isinstance(outcomes[3].error, MethodNotFound)


async def test_the_sdk_speaks_the_documented_envelope(echo_url: str) -> None:
    request = {
        "v": 1,
        "plugin": "echo",
        "method": "say",
        "params": {"text": "hi"},
        "context": {"request_id": "r1", "deadline_ms": 1000},
    }
    failing = {**request, "method": "withdraw", "params": {"amount": 500}}
    jsonschema.validate(request, ENVELOPE_SCHEMA)
    async with httpx.AsyncClient(base_url=echo_url) as client:
        single = (await client.post("/invoke", json=request)).json()
        batch = (await client.post("/invoke", json={"batch": [request, failing]})).json()
        malformed = await client.post(
            "/invoke", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        wrong_version = await client.post("/invoke", json={**request, "v": 2})
        described = (await client.get("/describe")).json()
    for answer in (single, batch, malformed.json(), wrong_version.json()):
        jsonschema.validate(answer, ENVELOPE_SCHEMA)
    assert batch["results"][1]["error"]["type"] == "InsufficientFunds"
    assert (malformed.status_code, wrong_version.status_code) == (400, 400)
    assert described["protocol"] == 1
    assert "say" in described["methods"]


async def test_leaving_the_context_leaves_no_task_or_socket_behind(echo_url: str) -> None:
    plugins = manifest(
        echo_plugin("local", LOCAL_TARGET),
        echo_plugin("remote", {"provider": "http", "url": echo_url}),
    )
    # Warm up once so lazily imported modules and thread pools are not counted as leaks.
    async with Dispatcher(plugins) as dispatcher:
        await dispatcher.call("remote", "say", {"text": "warm"})
    await asyncio.sleep(0.05)
    tasks_before = len(asyncio.all_tasks())
    descriptors_before = open_descriptors()
    async with Dispatcher(plugins) as dispatcher:
        await asyncio.gather(
            *(dispatcher.call("remote", "say", {"text": str(i)}) for i in range(20))
        )
        await dispatcher.call("local", "digest", {"data": "x", "rounds": 10})
        assert open_descriptors() > descriptors_before  # pooled connections were open
    await asyncio.sleep(0.05)  # let the server side notice the closed connections
    assert len(asyncio.all_tasks()) == tasks_before
    assert open_descriptors() == descriptors_before


def test_the_demo_manifest_is_valid() -> None:
    from dispatcher import load_manifest

    manifest_ = load_manifest(Path(ROOT / "plugins.yaml"))
    assert {plugin.id for plugin in manifest_.plugins} >= {"echo", "echo-http"}
