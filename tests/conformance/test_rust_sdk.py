"""What a host sees of the Rust SDK's service mode, with the real Rust example plugin
(``sdk/rust/dist/example-plugin``): a service's lifecycle run anew for each host that
attaches, health SERVING while it serves.
"""

from __future__ import annotations

import pytest

from dispatcher import Dispatcher
from tests.conformance.conftest import (
    CONFIG,
    LANGUAGES,
    START_TIMEOUT,
    _start_service,
    _stop_service,
    executable,
)
from tests.conformance.test_java_sdk import health_of, manifest

pytestmark = pytest.mark.skipif("rust" not in LANGUAGES, reason="the Rust SDK is not built here")


async def test_a_service_runs_the_lifecycle_of_each_host_with_its_config() -> None:
    """A second host attaching to a long-running service gets its own Init (its config,
    as ``config`` reports) and Start, after the first host's Stop and Destroy; health stays
    SERVING while the service serves calls."""
    from grpc_health.v1 import health_pb2

    service, address = await _start_service(executable("rust"))
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
