"""A plugin told where to send its spans stops within its caps, whatever the collector does, in every SDK.

The stop's caps (``LINCHKIT_PLUGIN_STOP_GRACE_MS``, ``_STOP_HOOKS_MS``) bound what a
SIGTERM waits for: the calls in flight, then the stop and destroy hooks. A plugin with
the standard ``OTEL_EXPORTER_OTLP_*`` variables also holds spans to send, and an SDK that
exports them sends those still buffered at the stop. A collector that accepts the
connection and never answers (or an endpoint that drops every packet) must not keep the
plugin past grace + hooks + ``SPAN_FLUSH_MARGIN`` (1 s): a platform kills it then, and a
host waits on it until then (docs/protocol.md, "Stopping while called").

Each case starts the example plugin of one SDK as a gRPC service (``serve --address``),
its variables naming a TCP server here that accepts and never answers, both caps 0 and
spans sent only at the stop; makes one call with a ``traceparent`` through the
dispatcher (a span buffered, in an SDK that traces), SIGTERMs the plugin and times its
exit; the SDKs that serve WebSocket are stopped the same way as ``serve --websocket``
(dialled by a ``provider: websocket`` target). The Go, TypeScript, Java and Rust SDKs send
the span for the 1 s margin and give up (``sdk/go/plugin/tracing_test.go``,
``sdk/typescript/test/tracing-stop.test.ts``,
``sdk/java/src/test/.../TracingStopTest.java`` for a subprocess whose stdin closes,
``sdk/rust/tests/sdk.rs``). The Python SDK's gRPC executable, run here, exports and
flushes as its other entry points do (``tests/test_python_plugin_tracing_stop.py`` holds
``dispatcher-plugin serve`` and the executable's WebSocket mode). The collector's URL and
the exporter's headers carry a secret (its password, its query) that no SDK may print;
every SDK says in one line that it dropped the spans, naming the collector by scheme,
host and port only.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from dispatcher import Dispatcher, parse_manifest
from tests.conformance.conftest import LANGUAGES, WEBSOCKET_MODES, _start_service, executable
from tests.services import CLEAN_ENVIRONMENT
from tests.test_telemetry_tracing import sdk_manifest

pytestmark = [pytest.mark.toolchain, pytest.mark.slow]

#: What every SDK gives the spans still buffered at the least, after its hooks.
SPAN_FLUSH_MARGIN = 1.0
#: Slack past grace + hooks + the margin (both caps are 0 here) for a slow, loaded machine
#: (a JVM's exit included); well short of the 5 s Go and TypeScript once gave the spans and
#: of the exporters' own 10 s.
SLACK = 2.5
SECRET = "s3cret-collector-token"
#: The SDKs whose executable serves WebSocket (``serve --websocket``), stopped the same way.
SERVING_WEBSOCKET = sorted(
    language for language, modes in WEBSOCKET_MODES.items() if "websocket" in modes
)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
async def silent_collector() -> AsyncIterator[str]:
    """An OTLP/HTTP traces URL whose server accepts every connection and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://collector:{SECRET}@127.0.0.1:{port}/v1/traces?key={SECRET}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def traced_environment(collector: str, caps_ms: int | None) -> dict[str, str]:
    """A plugin's environment sending its spans to ``collector`` (with a secret header)
    only at the stop, both caps ``caps_ms`` (None: the defaults)."""
    env = {k: v for k, v in CLEAN_ENVIRONMENT.items() if not k.startswith("OTEL_")} | {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector,
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": f"authorization=Bearer%20{SECRET}",
        # Nothing sent before the stop: the call's span waits in the buffer for it.
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
    }
    if caps_ms is not None:
        env |= {"LINCHKIT_PLUGIN_STOP_GRACE_MS": str(caps_ms)}
        env |= {"LINCHKIT_PLUGIN_STOP_HOOKS_MS": str(caps_ms)}
    return env


def _manifest(mode: str, address: str) -> Any:
    if mode == "grpc":
        return sdk_manifest(address, None)
    target = {"provider": "websocket", "url": f"ws://{address}/"}
    plugin = {"id": "example", "version": "1.0.0", "target": target, "methods": {"echo": {}}}
    return parse_manifest({"plugins": [{**plugin, "defaults": {"timeout_ms": 20_000}}]})


async def stopped_after_a_traced_call(
    language: str, env: dict[str, str], *, mode: str = "grpc"
) -> tuple[float, int | None, str]:
    """The example plugin of ``language`` served in ``mode`` (``grpc``, ``websocket``)
    in ``env``, one call with a ``traceparent`` through the dispatcher, then SIGTERM: how
    long it took to exit, its exit status, its stderr."""
    extra = ("--websocket",) if mode == "websocket" else ()
    process, address = await _start_service(
        executable(language), env, asyncio.subprocess.PIPE, protocol=mode, extra=extra
    )
    try:
        assert process.stderr is not None
        said = asyncio.create_task(process.stderr.read())  # read all along: a full pipe blocks
        async with Dispatcher(_manifest(mode, address)) as dispatcher:
            result = await dispatcher.call(
                "example", "echo", {"text": "traced"}, traceparent=TRACEPARENT
            )
        assert result == {"text": "traced"}
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            await process.wait()
            took = time.monotonic() - began
            stderr = (await said).decode(errors="replace")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return took, process.returncode, stderr


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_silent_collector_keeps_the_stop_within_the_caps(
    language: str, silent_collector: str
) -> None:
    took, returncode, stderr = await stopped_after_a_traced_call(
        language, traced_environment(silent_collector, 0)
    )
    assert took < SPAN_FLUSH_MARGIN + SLACK, (language, took, stderr)
    assert returncode == 0, (language, stderr)
    assert SECRET not in stderr, (language, stderr)
    said_once_naming_the_collector(language, stderr, silent_collector)


@pytest.mark.parametrize("language", SERVING_WEBSOCKET)
async def test_a_silent_collector_keeps_a_websocket_server_s_stop_within_the_caps(
    language: str, silent_collector: str
) -> None:
    """``serve --websocket`` runs its own stop (goaway, the hooks) and sends its spans after
    it, within the same bound as the gRPC service."""
    took, returncode, stderr = await stopped_after_a_traced_call(
        language, traced_environment(silent_collector, 0), mode="websocket"
    )
    assert took < SPAN_FLUSH_MARGIN + SLACK, (language, took, stderr)
    assert returncode == 0, (language, stderr)
    assert SECRET not in stderr, (language, stderr)
    said_once_naming_the_collector(language, stderr, silent_collector)


def said_once_naming_the_collector(language: str, stderr: str, silent_collector: str) -> None:
    """One line for the spans dropped, naming the collector by scheme://host:port only."""
    collector = urlsplit(silent_collector)
    shown = f"{collector.scheme}://{collector.hostname}:{collector.port}"
    warnings = [line for line in stderr.splitlines() if "spans dropped" in line]
    assert len(warnings) == 1, (language, stderr)
    assert f"the trace collector at {shown} " in warnings[0], (language, stderr)
    for hidden in ("/v1/traces", "?", "collector@"):
        assert hidden not in warnings[0], (language, hidden, stderr)
