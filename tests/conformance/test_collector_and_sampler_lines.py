"""What every SDK says of its tracing, on stderr, when something is wrong with it.

- A trace collector that stops taking spans (it answers 500) is said once, not once per
  batch, naming the collector by scheme://host:port only (its URL's user and password,
  path and query may hold a token), and once more when it takes them again. The spans go
  to the URL as written: its query too, its user and password as basic authentication.
- An ``OTEL_TRACES_SAMPLER`` no SDK knows, or an ``OTEL_TRACES_SAMPLER_ARG`` that is no
  ratio, is said once when the plugin starts (each SDK in its own words, or its
  OpenTelemetry's): the plugin then samples as the fallback says
  (tests/test_telemetry_tracing.py checks which spans it sends).

Each case starts the example plugin of one SDK as a gRPC service (``serve --address``)
with its stderr read all along, as tests/conformance/test_stop_with_a_silent_collector.py
does.
"""

from __future__ import annotations

import asyncio
import base64
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from dispatcher import Dispatcher
from tests.conformance.conftest import LANGUAGES, _start_service, executable
from tests.services import CLEAN_ENVIRONMENT
from tests.test_telemetry_tracing import sdk_manifest, traces_receiver

pytestmark = [pytest.mark.toolchain, pytest.mark.slow]

SECRET = "s3cret-collector-token"
#: The SDKs that say a collector's outage once and its end once: all of them (Go's said
#: each failed batch through OpenTelemetry's default error handler until 2026-12-06).
SAYING_OUTAGES = list(LANGUAGES)


class FailingCollector:
    """An OTLP/HTTP traces receiver that answers 500 while ``failing``, 200 after; the
    requests it got (path and query) and their ``Authorization``."""

    def __init__(self) -> None:
        self.failing = True
        self.requests: list[str] = []
        self.authorizations: list[str] = []
        self.taken = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests.append(request.path_qs)
        self.authorizations.append(request.headers.get("Authorization", ""))
        if self.failing:
            return web.Response(status=500)
        self.taken += 1
        return web.Response(status=200, content_type="application/x-protobuf", body=b"")


@pytest.fixture
async def failing_collector() -> AsyncIterator[tuple[FailingCollector, int]]:
    received = FailingCollector()
    async with traces_receiver(received.handle) as port:
        yield received, port


async def run_plugin(
    language: str, env: dict[str, str], during: Any = None
) -> tuple[int | None, str]:
    """The example plugin of ``language`` in ``env``, ``during(dispatcher)`` awaited while it
    serves, then SIGTERM; its exit status and its stderr."""
    process, address = await _start_service(
        executable(language), env, asyncio.subprocess.PIPE, protocol="grpc", extra=()
    )
    try:
        assert process.stderr is not None
        said = asyncio.create_task(process.stderr.read())  # read all along: a full pipe blocks
        if during is not None:
            async with Dispatcher(sdk_manifest(address, None)) as dispatcher:
                await during(dispatcher)
        else:
            await asyncio.sleep(1)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            await process.wait()
            stderr = (await said).decode(errors="replace")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, stderr


def otel_environment(**variables: str) -> dict[str, str]:
    return {k: v for k, v in CLEAN_ENVIRONMENT.items() if not k.startswith("OTEL_")} | variables


@pytest.mark.parametrize("language", SAYING_OUTAGES)
async def test_a_collector_outage_is_said_once_and_its_end_once(
    language: str, failing_collector: tuple[FailingCollector, int]
) -> None:
    collector, port = failing_collector
    url = f"http://collector:{SECRET}@127.0.0.1:{port}/v1/traces?key={SECRET}"
    shown = f"http://127.0.0.1:{port}"

    async def calls(dispatcher: Dispatcher) -> None:
        for number in range(6):  # a batch each: the schedule delay is 50 ms
            assert await dispatcher.call("example", "echo", {"n": number}) == {"n": number}
            await asyncio.sleep(0.4)
        failed = len(collector.requests)
        assert failed >= 2, f"{failed} batches: the outage must span several"
        collector.failing = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while collector.taken == 0:
            assert loop.time() < deadline, "no span reached the collector once it took them"
            await dispatcher.call("example", "echo", {"n": "again"})
            await asyncio.sleep(0.4)

    returncode, stderr = await run_plugin(
        language,
        otel_environment(
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=url,
            OTEL_BSP_SCHEDULE_DELAY="50",
        ),
        calls,
    )
    assert returncode == 0, (language, stderr)
    assert SECRET not in stderr, (language, stderr)
    # The URL as written: its query reaches the collector, its user as basic authentication.
    assert set(collector.requests) == {f"/v1/traces?key={SECRET}"}, (language, collector.requests)
    expected = "Basic " + base64.b64encode(f"collector:{SECRET}".encode()).decode()
    assert set(collector.authorizations) == {expected}, (language, collector.authorizations)
    lines = [line for line in stderr.splitlines() if f"the trace collector at {shown}" in line]
    assert len(lines) == 2, (language, stderr)
    assert "takes spans again" not in lines[0] and "takes spans again" in lines[1], stderr
    for line in lines:
        for hidden in ("/v1/traces", "?key", "collector@"):
            assert hidden not in line, (language, hidden, stderr)


@pytest.mark.parametrize("language", LANGUAGES)
async def test_an_authorization_the_headers_set_wins_over_the_url_s_user(
    language: str, failing_collector: tuple[FailingCollector, int]
) -> None:
    """Both given, the ``Authorization`` of ``OTEL_EXPORTER_OTLP_HEADERS`` is sent, never the
    URL's user and password in its place (Python's ``requests`` and the Go SDK's transport
    put the URL's there until 2026-12-06)."""
    collector, port = failing_collector
    collector.failing = False

    async def calls(dispatcher: Dispatcher) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not collector.taken:
            assert loop.time() < deadline, "no span reached the collector"
            await dispatcher.call("example", "echo", {"n": 1})
            await asyncio.sleep(0.2)

    returncode, stderr = await run_plugin(
        language,
        otel_environment(
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://collector:{SECRET}@127.0.0.1:{port}/v1/traces",
            OTEL_EXPORTER_OTLP_HEADERS="Authorization=Bearer%20header-token",
            OTEL_BSP_SCHEDULE_DELAY="50",
        ),
        calls,
    )
    assert returncode == 0, (language, stderr)
    assert set(collector.authorizations) == {"Bearer header-token"}, (language, collector)


@pytest.mark.parametrize(
    ("sampler", "echoed"),
    [
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "sometimes"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "lots"}, "lots"),
    ],
    ids=["unknown-sampler", "not-a-ratio"],
)
@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_sampler_that_cannot_be_used_is_said_once(
    language: str, sampler: dict[str, str], echoed: str
) -> None:
    returncode, stderr = await run_plugin(
        language,
        otel_environment(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", **sampler),
    )
    assert returncode == 0, (language, stderr)
    said = [line for line in stderr.splitlines() if "sampler" in line.lower()]
    assert len(said) == 1, (language, stderr)
    if language != "python":  # OpenTelemetry Python's own line does not repeat the value
        assert echoed in said[0], (language, stderr)
