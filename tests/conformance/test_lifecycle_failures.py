"""A lifecycle hook that fails, in every SDK: the example plugin served with ``serve
--address`` and started by a dispatcher (``lifecycle: dispatcher``) whose config's
``fail_hook`` names the hook to fail (docs/protocol.md, "The example plugin").

Every SDK answers the step ``FAILED_PRECONDITION`` naming the hook and the plugin's error
(docs/protocol.md, "gRPC binding"), and the dispatcher fails its start with
``ProviderError``, not retryable, naming the step and the error type
(``providers._grpc.status.lifecycle_failure``). Before, the Java and TypeScript SDKs
answered ``INTERNAL``, grpc's code for its own broken invariants.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import orjson
import pytest

from dispatcher import Dispatcher, ProviderError
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from tests.conformance.conftest import (
    CONFIG,
    LANGUAGES,
    START_TIMEOUT,
    _start_service,
    _stop_service,
    executable,
)
from tests.conformance.test_several_hosts import manifest, target

#: The status each SDK answers a failing hook with: the same in every language.
STATUS = dict.fromkeys(LANGUAGES, grpc.StatusCode.FAILED_PRECONDITION)


@pytest.fixture(params=LANGUAGES)
async def service(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str]]:
    """The example plugin of one language in service mode: its language and address."""
    process, address = await _start_service(executable(request.param))
    try:
        yield request.param, address
    finally:
        await _stop_service(process)


async def answer_to(address: str, config: dict[str, Any], step: str) -> grpc.aio.AioRpcError:
    """The status the plugin answers ``step`` with (after an ``Init`` for ``Start``), sent
    by hand as any host sends it."""
    metadata = (("linchkit-host", "raw"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = plugin_pb2_grpc.PluginServiceStub(channel)
        try:
            init = plugin_pb2.InitRequest(config_json=orjson.dumps(config))
            await stub.Init(init, metadata=metadata, timeout=START_TIMEOUT)
            if step == "Start":
                start = plugin_pb2.LifecycleRequest()
                await stub.Start(start, metadata=metadata, timeout=START_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            return error
    pytest.fail(f"{step} answered OK with fail_hook naming it")


@pytest.mark.parametrize("step", ["Init", "Start"])
async def test_a_failing_hook_is_failed_precondition_naming_it(
    service: tuple[str, str], step: str
) -> None:
    language, address = service
    hook = step.lower()
    config = {**CONFIG, "fail_hook": hook}
    refused = await answer_to(address, config, step)
    assert refused.code() == STATUS[language], (language, refused)
    said = refused.details() or ""
    assert "BadConfig" in said and f"fail_hook names {hook}" in said, said
    assert said.lower().startswith(f"{hook} "), said  # "init hook failed: …", "init failed: …"
    # Through the dispatcher, whose start it fails.
    with pytest.raises(ProviderError) as failed:
        async with Dispatcher(manifest(target(address), config)):
            pass
    assert not failed.value.retryable
    assert f"the plugin failed its {step}: BadConfig: fail_hook names {hook}" in (
        failed.value.message
    ), failed.value.message
    assert failed.value.details == {
        "step": step,
        "error_type": "BadConfig",
        "status": STATUS[language].name,
    }
