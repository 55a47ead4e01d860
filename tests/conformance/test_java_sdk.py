"""What a host sees of the Java SDK where it once differed from the other SDKs, with the
real Java example plugin (``sdk/java/dist/example-plugin``): a service's lifecycle run
anew for each host that attaches, a subprocess launch that logs no false warning, a reply
over the gRPC size cap answered as an error rather than sent, and ``--help`` without
``serve``.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from typing import Any

import pytest

from dispatcher import Dispatcher, ProviderError, parse_manifest
from tests.conformance.conftest import (
    CONFIG,
    LANGUAGES,
    START_TIMEOUT,
    _start_service,
    _stop_service,
    executable,
)
from tests.conftest import ROOT
from tests.services import CLEAN_ENVIRONMENT

pytestmark = pytest.mark.skipif("java" not in LANGUAGES, reason="the Java SDK is not built here")

#: Two chunks of ``count`` of 36 MB each, gathered into one unary reply: past the 64 MiB
#: cap (~72 MB of JSON), within the example's bounds on ``n`` and ``pad``.
OVER_THE_CAP = {"n": 2, "pad": 36_000_000}


def manifest(
    target: dict[str, Any],
    config: dict[str, Any],
    methods: tuple[str, ...] = ("echo", "count", "config"),
) -> Any:
    """The example plugin on ``target`` with ``config``, routing ``methods``."""
    return parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "example",
                    "version": "1.0.0",
                    "config": config,
                    "target": target,
                    "lifecycle": {"init_timeout_ms": int(START_TIMEOUT * 1000)},
                    "defaults": {"timeout_ms": 60_000},
                    "methods": {name: {} for name in methods},
                }
            ],
        },
        base_dir=ROOT,
    )


async def health_of(address: str) -> Any:
    import grpc.aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="linchkit.plugin.v1.PluginService"), timeout=10
        )
    return reply.status


async def test_a_service_runs_the_lifecycle_of_each_host_with_its_config() -> None:
    """A second host attaching to a long-running service gets its own Init (its config,
    as ``config`` reports) and Start, after the first host's Stop and Destroy; health stays
    SERVING while the service serves calls."""
    from grpc_health.v1 import health_pb2

    service, address = await _start_service(executable("java"))
    try:
        target = {
            "provider": "grpc",
            "address": address,
            "lifecycle": "dispatcher",
            "connect_timeout_ms": int(START_TIMEOUT * 1000),
        }
        for host in ("first", "second"):
            config = {**CONFIG, "host": host}
            async with Dispatcher(manifest(target, config)) as dispatcher:
                assert await dispatcher.call("example", "config", {}) == config
            # That host detached (Stop, Destroy): the service still serves, and says so.
            assert await health_of(address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await _stop_service(service)


async def test_a_subprocess_logs_no_warning_and_refuses_a_reply_over_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plain launch on a Unix socket logs nothing at WARNING (Netty once warned of
    SO_KEEPALIVE, which a Unix socket lacks, at every connection). A result over the 64 MiB
    cap comes back as the plugin's ``provider_error`` with ``details.reason`` ``too_large``,
    without being sent, so no stream error (with its Netty stack) reaches the host's log."""
    caplog.set_level(logging.DEBUG, logger="dispatcher.plugin.example")
    target = {
        "provider": "subprocess",
        "command": [str(executable("java"))],
        "handshake_timeout_ms": int(START_TIMEOUT * 1000),
        "health_interval_ms": 0,
    }
    async with Dispatcher(manifest(target, CONFIG)) as dispatcher:
        assert await dispatcher.call("example", "echo", {"hi": 1}) == {"hi": 1}
        with pytest.raises(ProviderError) as refused:
            await dispatcher.call("example", "count", OVER_THE_CAP)
        assert refused.value.details is not None
        assert refused.value.details["reason"] == "too_large", refused.value
        assert refused.value.retryable is False
        assert "over the gRPC message size cap" in str(refused.value), refused.value
        assert await dispatcher.call("example", "echo", {"still": "serving"}) == {
            "still": "serving"
        }
        await asyncio.sleep(0.5)  # the plugin's last stderr lines
    logged = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "dispatcher.plugin.example" and r.levelno >= logging.WARNING
    ]
    assert logged == []


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_without_serve_shows_the_usage(flag: str) -> None:
    done = subprocess.run(
        [str(executable("java")), flag],
        capture_output=True,
        text=True,
        timeout=60,
        env=CLEAN_ENVIRONMENT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "usage:" in done.stdout and "--address" in done.stdout
    assert "unknown command" not in done.stderr
