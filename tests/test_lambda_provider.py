"""The Lambda provider against real components: moto's server and the AWS Lambda runtime.

The example plugin is deployed with ``dispatcher deploy``'s code and runs in
aws-lambda-rie containers; what is asserted is the Invoke API as AWS documents it
(see ``dispatcher/testing/local_lambda/front.py``), never a moto quirk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from dispatcher import (
    DeadlineExceeded,
    Dispatcher,
    InvalidParams,
    Invocation,
    PluginError,
    PluginNotFound,
    RateLimited,
    TargetUnavailable,
    Unauthorized,
    parse_manifest,
)
from dispatcher.testing.lambda_kit import create_role, deploy_manifest, point_at, reset_moto
from dispatcher.testing.local_lambda import LocalLambda
from providers.aws_lambda import LambdaProvider, LambdaTarget
from tests.conftest import ROOT
from tests.lambda_support import ROLE, echo_lambda_manifest, raw_zip

pytestmark = pytest.mark.asyncio(loop_scope="module")


class Env:
    def __init__(self, local: LocalLambda, dispatcher: Dispatcher, provider: LambdaProvider):
        self.local = local
        self.dispatcher = dispatcher
        self.provider = provider

    def target(self, function_name: str = "raw", **options: Any) -> LambdaTarget:
        return LambdaTarget(
            provider="lambda",
            function_name=function_name,
            endpoint_url=self.local.url,
            region="us-east-1",
            **options,
        )


def invocation(
    params: Any, *, method: str = "say", timeout: float = 10.0, **extra: Any
) -> Invocation:
    return Invocation(
        plugin="raw",
        version="1.0.0",
        method=method,
        params=params,
        deadline=asyncio.get_running_loop().time() + timeout,
        request_id="req-1",
        **extra,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(moto_server: str) -> AsyncIterator[Env]:
    await reset_moto(moto_server)
    async with LocalLambda(moto_server) as local:
        manifest = await deploy_manifest(echo_lambda_manifest(), local.url, base_dir=ROOT)
        async with Dispatcher(manifest) as dispatcher, LambdaProvider() as provider:
            environment = Env(local, dispatcher, provider)
            client = await provider.client(environment.target())
            await create_role(local.url, ROLE.rpartition("/")[2])
            for name in ("raw", "throttled"):
                await client.create_function(
                    FunctionName=name,
                    Runtime="python3.11",
                    Role=ROLE,
                    Handler="raw.handler",
                    Code={"ZipFile": raw_zip()},
                    Timeout=3,
                )
            version = await client.publish_version(FunctionName="raw")
            await client.create_alias(
                FunctionName="raw", Name="stable", FunctionVersion=version["Version"]
            )
            await client.put_function_concurrency(
                FunctionName="throttled", ReservedConcurrentExecutions=0
            )
            yield environment


async def test_the_example_plugin_answers_through_the_dispatcher(env: Env) -> None:
    result = await env.dispatcher.call("echo-lambda", "say", {"text": "hi"}, caller="alice")
    assert result == {"text": "hi", "greeting": "from lambda", "caller": "alice"}
    # A synchronous (CPU-bound) method runs in the Lambda too.
    digest = await env.dispatcher.call("echo-lambda", "digest", {"data": "abc", "rounds": 1})
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


async def test_a_plugin_error_keeps_its_type_and_message(env: Env) -> None:
    with pytest.raises(PluginError) as caught:
        await env.dispatcher.call("echo-lambda", "withdraw", {"amount": 500})
    assert caught.value.remote_type == "InsufficientFunds"
    assert caught.value.message == "cannot withdraw 500: balance is 100"


async def test_params_that_do_not_bind_are_invalid(env: Env) -> None:
    with pytest.raises(InvalidParams):
        await env.dispatcher.call("echo-lambda", "say", {"wrong": 1})


async def test_the_callers_deadline_travels_to_the_plugin(env: Env) -> None:
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await env.dispatcher.call("echo-lambda", "sleep", {"seconds": 5}, timeout=1.0)
    assert time.monotonic() - started < 3


async def test_a_handler_exception_is_an_unhandled_function_error(env: Env) -> None:
    with pytest.raises(PluginError) as caught:
        await env.provider.invoke(env.target(envelope=False), invocation({"boom": "gone"}))
    assert caught.value.remote_type == "KeyError"
    assert caught.value.message == "'gone'"
    assert caught.value.details["function_error"] == "Unhandled"
    assert caught.value.details["stack_trace"]


async def test_the_lambda_timeout_is_a_deadline_exceeded(env: Env) -> None:
    # The function's own timeout (3 s), enforced by the real runtime, not the caller's.
    with pytest.raises(DeadlineExceeded, match=r"Task timed out after 3\.00 seconds"):
        await env.provider.invoke(env.target(envelope=False), invocation({"sleep": 6}))


async def test_the_call_after_a_timed_out_one_is_answered(env: Env) -> None:
    # The runtime resets after a timeout; a call that met the reset in the same environment
    # was answered Sandbox.Failure ("ErrGateCanceled") at once. Lambda runs it after an init.
    for _ in range(2):
        with pytest.raises(DeadlineExceeded, match=r"Task timed out after 3\.00 seconds"):
            await env.provider.invoke(env.target(envelope=False), invocation({"sleep": 6}))
        result = await env.provider.invoke(env.target(envelope=False), invocation({"x": 1}))
        assert result["event"] == {"x": 1}


async def test_a_function_that_outlives_the_callers_deadline_is_cut_off(env: Env) -> None:
    # A handler that ignores deadlines: the provider's own timeout ends the call.
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="did not answer within"):
        await env.provider.invoke(
            env.target(envelope=False), invocation({"sleep": 2.5}, timeout=0.5)
        )
    assert time.monotonic() - started < 2


async def test_the_client_context_carries_the_envelope_context(env: Env) -> None:
    call = invocation({"x": 1}, caller="bob", traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    result = await env.provider.invoke(env.target(envelope=False), call)
    assert result["event"] == {"x": 1}
    assert result["custom"]["request_id"] == "req-1"
    assert result["custom"]["caller"] == "bob"
    assert result["custom"]["traceparent"].startswith("00-111")
    assert 0 < result["custom"]["deadline_ms"] <= 10_000


async def test_a_qualifier_selects_the_version_or_alias(env: Env) -> None:
    unqualified = await env.provider.invoke(env.target(envelope=False), invocation({}))
    by_alias = await env.provider.invoke(
        env.target(envelope=False, qualifier="stable"), invocation({})
    )
    by_version = await env.provider.invoke(
        env.target(envelope=False, qualifier="1"), invocation({})
    )
    assert unqualified["version"] == "$LATEST"
    assert by_alias["version"] == by_version["version"] == "1"


async def test_an_event_invocation_returns_an_accepted_handle(env: Env) -> None:
    before = env.local.invocations
    handle = await env.provider.invoke(
        env.target(envelope=False, invocation_type="Event"), invocation({"sleep": 0.2})
    )
    assert handle["accepted"] is True
    assert handle["status"] == 202
    assert handle["request_id"]
    # It returned before the function ran; the function still runs, in the background.
    for _ in range(400):
        if env.local.invocations > before:
            break
        await asyncio.sleep(0.05)
    assert env.local.invocations == before + 1


async def test_an_unknown_function_or_qualifier_is_not_found(env: Env) -> None:
    with pytest.raises(PluginNotFound, match="dispatcher deploy"):
        await env.provider.invoke(env.target("missing"), invocation({}))
    with pytest.raises(PluginNotFound):
        await env.provider.invoke(env.target("raw", qualifier="nope"), invocation({}))


async def test_throttling_is_rate_limited_with_retry_after(env: Env) -> None:
    with pytest.raises(RateLimited) as caught:
        await env.provider.invoke(env.target("throttled", envelope=False), invocation({}))
    assert caught.value.retryable
    assert caught.value.retry_after == 1.0
    assert caught.value.details["reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"


async def test_a_request_over_the_payload_limit_is_invalid_params(env: Env) -> None:
    with pytest.raises(InvalidParams, match="too large"):
        await env.provider.invoke(env.target(), invocation({"text": "x" * (7 * 1024 * 1024)}))


async def test_an_unreachable_endpoint_is_target_unavailable(env: Env) -> None:
    target = LambdaTarget(
        provider="lambda",
        function_name="raw",
        endpoint_url="http://127.0.0.1:9",
        region="us-east-1",
    )
    with pytest.raises(TargetUnavailable) as caught:
        await env.provider.invoke(target, invocation({}))
    assert caught.value.retryable


async def test_a_batch_is_one_invocation_and_one_failure_fails_only_itself(env: Env) -> None:
    target = env.target("echo-plugin", qualifier="live")
    before = env.local.invocations
    outcomes = await env.provider.invoke_batch(
        target,
        [
            invocation({"text": "a"}),
            invocation({"amount": 500}, method="withdraw"),
            invocation({"text": "c"}),
        ],
    )
    assert env.local.invocations == before + 1
    assert outcomes[0].unwrap()["text"] == "a"
    assert isinstance(outcomes[1].error, PluginError)
    assert outcomes[1].error.remote_type == "InsufficientFunds"
    assert outcomes[2].unwrap()["text"] == "c"


async def test_health_reports_an_active_function(env: Env) -> None:
    serving = await env.provider.health(env.target("echo-plugin", qualifier="live"))
    missing = await env.provider.health(env.target("missing"))
    assert serving.status == "serving", serving.detail
    assert "State Active" in serving.detail
    assert missing.status == "not_serving"


async def test_log_tail_goes_to_the_debug_log(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="dispatcher.providers.lambda"):
        await env.provider.invoke(env.target(envelope=False, log_tail=True), invocation({}))
    lines = [record.getMessage() for record in caplog.records]
    assert any("START RequestId:" in line for line in lines), lines
    assert any("REPORT RequestId:" in line for line in lines), lines


async def test_one_client_per_region_for_the_providers_life(env: Env) -> None:
    first = await env.provider.client(env.target("raw"))
    again = await env.provider.client(env.target("echo-plugin", qualifier="live"))
    other = await env.provider.client(
        LambdaTarget(
            provider="lambda", function_name="raw", endpoint_url=env.local.url, region="eu-west-1"
        )
    )
    assert first is again
    assert other is not first


async def test_concurrent_first_calls_share_one_client(env: Env) -> None:
    async with LambdaProvider() as provider:
        clients = await asyncio.gather(*(provider.client(env.target()) for _ in range(5)))
        assert all(client is clients[0] for client in clients)
        assert "us-east-1" in repr(provider)


async def test_a_service_failure_is_target_unavailable(env: Env) -> None:
    # A function created behind the local Lambda's back (straight in moto): it has no code
    # to run it with and answers 500 ServiceException, as Lambda does when it fails itself.
    direct = LambdaTarget(
        provider="lambda",
        function_name="no-code",
        endpoint_url=env.local.control_plane_url,
        region="us-east-1",
    )
    client = await env.provider.client(direct)
    await client.create_function(
        FunctionName="no-code",
        Runtime="python3.11",
        Role=ROLE,
        Handler="raw.handler",
        Code={"ZipFile": raw_zip("never seen by the local Lambda")},
    )
    with pytest.raises(TargetUnavailable, match="ServiceException") as caught:
        await env.provider.invoke(env.target("no-code"), invocation({}))
    assert caught.value.retryable
    assert caught.value.details["status"] == 500


async def test_the_batching_policy_sends_concurrent_calls_as_one_invocation(env: Env) -> None:
    document = point_at(echo_lambda_manifest(), env.local.url)
    document["plugins"][0]["methods"]["say"] = {"batch": {"max_size": 50, "max_wait_ms": 50}}
    async with Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher:
        before = env.local.invocations
        answers = await asyncio.gather(
            *(dispatcher.call("echo-lambda", "say", {"text": str(i)}) for i in range(20))
        )
    assert [answer["text"] for answer in answers] == [str(i) for i in range(20)]
    assert env.local.invocations - before <= 2  # one batch, or two if the window split it


async def test_no_credentials_in_the_standard_chain_is_unauthorized(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    async with LambdaProvider() as provider:
        with pytest.raises(Unauthorized, match="no usable AWS credentials"):
            await provider.invoke(env.target(envelope=False), invocation({}))
