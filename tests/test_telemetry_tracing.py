"""One trace from the host through the dispatcher into a plugin, as an OTLP collector sees it.

The collector is a small aiohttp server in the test, decoding OTLP/HTTP protobuf with
opentelemetry-proto; the dispatcher sends with the SDK's OTLP/HTTP exporter (its manifest
names the endpoint); the plugin is the example served by ``dispatcher-plugin serve`` in its
own process, exporting through the standard ``OTEL_*`` variables. The example plugin of
each SDK (``make sdks``: Python's too) is held to the same as a gRPC service: one span
``linchkit.plugin/<method>`` per call, with the same attributes in every language; over
WebSocket (TypeScript's, Go's, Rust's and Java's ``serve --websocket`` and ``connect``; Python's
in tests/test_python_plugin_spans.py) a call and a stream are traced the same.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from dispatcher import Dispatcher, PluginError, parse_manifest
from linchkit_plugin import PluginHost
from tests.conformance.conftest import INBOUND_TOKEN, _dialling_in, executable
from tests.conformance.conftest import _start_service as start_service
from tests.conformance.conftest import _start_websocket_service as start_websocket_service
from tests.conformance.conftest import _stop_service as stop_service
from tests.conftest import EXAMPLES, ROOT, bound_socket
from tests.services import free_port

BIN = Path(sys.executable).parent
PATIENCE = 60.0


@dataclass
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    #: OTLP's status code (0 unset, 1 ok, 2 error) and message.
    status: tuple[int, str] = (0, "")


class Collector:
    """An OTLP/HTTP traces receiver: what every service sent, decoded."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        self.requests += 1
        for resource_spans in export.resource_spans:
            service = next(
                (
                    attribute.value.string_value
                    for attribute in resource_spans.resource.attributes
                    if attribute.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service,
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.kind,
                            {a.key: _value(a.value) for a in span.attributes},
                            (span.status.code, span.status.message),
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def named(self, name: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.name == name]


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@asynccontextmanager
async def traces_receiver(handle: Any) -> AsyncIterator[int]:
    """An OTLP/HTTP collector on loopback whose ``POST /v1/traces`` is ``handle``; its port."""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/v1/traces", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = bound_socket()
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield sock.getsockname()[1]
    finally:
        await runner.cleanup()


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, str]]:
    received = Collector()
    async with traces_receiver(received.handle) as port:
        yield received, f"http://127.0.0.1:{port}"


async def until(predicate: Any, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"waited {PATIENCE:g} s for {what}")
        await asyncio.sleep(0.05)


async def test_one_trace_spans_host_dispatcher_and_a_python_plugin_process(
    collector: tuple[Collector, str], plugins: Any
) -> None:
    received, base = collector
    port = free_port()
    plugin = plugins(
        [
            str(BIN / "dispatcher-plugin"),
            "serve",
            "echo_plugin:EchoPlugin",
            "--path",
            str(EXAMPLES),
            "--port",
            str(port),
        ],
        OTEL_EXPORTER_OTLP_ENDPOINT=base,
        OTEL_SERVICE_NAME="echo-plugin",
        OTEL_BSP_SCHEDULE_DELAY="50",  # ms: send spans soon, not after the default 5 s
    )
    plugin.wait_said("listening on")
    manifest = parse_manifest(
        {
            "version": 1,
            "telemetry": {
                "tracing": {"otlp_endpoint": f"{base}/v1/traces", "service_name": "the-dispatcher"}
            },
            "plugins": [
                {
                    "id": "echo",
                    "version": "1.0.0",
                    "target": {"provider": "http", "url": f"http://127.0.0.1:{port}"},
                    "methods": {"say": {}},
                }
            ],
        },
        base_dir=ROOT,
    )
    # The host traces too, with a provider of its own (not the global one): the dispatcher
    # continues whatever span is current.
    host = TracerProvider(resource=Resource.create({"service.name": "the-host"}))
    host.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces")))
    async with Dispatcher(manifest) as dispatcher:
        with host.get_tracer("host").start_as_current_span("handle request") as host_span:
            result = await dispatcher.call("echo", "say", {"text": "traced"})
    await asyncio.to_thread(host.shutdown)
    assert result["text"] == "traced"

    await until(lambda: received.named("linchkit.plugin/say"), "the plugin's span")
    (host_received,) = received.named("handle request")
    (call,) = received.named("echo.say")
    (attempt,) = received.named("echo.say attempt")
    (in_plugin,) = received.named("linchkit.plugin/say")
    trace_id = f"{host_span.get_span_context().trace_id:032x}"
    assert {s.trace_id for s in (host_received, call, attempt, in_plugin)} == {trace_id}
    assert call.parent_span_id == host_received.span_id
    assert attempt.parent_span_id == call.span_id
    assert in_plugin.parent_span_id == attempt.span_id
    assert (host_received.service, call.service, in_plugin.service) == (
        "the-host",
        "the-dispatcher",
        "echo-plugin",
    )
    assert in_plugin.kind == trace.SpanKind.SERVER.value + 1  # OTLP's enum counts from UNSPECIFIED
    assert call.attributes["linchkit.plugin"] == "echo"
    assert attempt.attributes["linchkit.instance"] == f"http http://127.0.0.1:{port}/invoke"
    # Served over HTTP with no id of its own, the plugin names the id its envelope carries.
    assert in_plugin.attributes["linchkit.plugin"] == "echo"
    assert in_plugin.attributes["linchkit.method"] == "say"
    assert in_plugin.attributes["linchkit.outcome"] == "ok"
    assert in_plugin.attributes["code.namespace"] == "EchoPlugin"


@pytest.mark.parametrize(
    "traceparent",
    ["garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "x" * 100_000, 42],
)
async def test_the_sdk_runs_a_call_with_a_malformed_traceparent_untraced(traceparent: Any) -> None:
    from echo_plugin import EchoPlugin

    host = PluginHost(EchoPlugin())
    await host.init({})
    await host.start()
    try:
        result = await host.call("say", {"text": "hi"}, {"traceparent": traceparent})
    finally:
        await host.close()
    assert result["text"] == "hi"


# -- every SDK's example plugin --------------------------------------------------------------
# Built by `make sdks`, served as gRPC services as the conformance suite runs them, with or
# without the standard OTel variables.

SDK_LANGUAGES = ("go", "typescript", "java", "python", "rust")
TRACEPARENT_MALFORMED = ["garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "x" * 4096]


@asynccontextmanager
async def sdk_plugin(language: str, **otel: str) -> AsyncIterator[str]:
    """The example plugin of ``language`` as a gRPC service with ``otel`` (and no other
    ``OTEL_*`` variable) in its environment; yields its address, stops it (SIGTERM, a
    graceful stop that flushes its spans) on leaving."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | otel
    process, address = await start_service(executable(language), env)
    try:
        yield address
    finally:
        await stop_service(process)


def sdk_manifest(address: str, collector_base: str | None) -> Any:
    telemetry = (
        {
            "tracing": {
                "otlp_endpoint": f"{collector_base}/v1/traces",
                "service_name": "the-dispatcher",
            }
        }
        if collector_base
        else {}
    )
    return parse_manifest(
        {
            "version": 1,
            "telemetry": telemetry,
            "plugins": [
                {
                    "id": "example",
                    "version": "1.0.0",
                    "target": {"provider": "grpc", "address": address, "lifecycle": "dispatcher"},
                    "defaults": {"timeout_ms": 20_000},
                    "methods": {"echo": {}, "fail": {}},
                }
            ],
        },
        base_dir=ROOT,
    )


@pytest.mark.parametrize("language", SDK_LANGUAGES)
async def test_one_trace_spans_the_dispatcher_and_an_sdk_plugin(
    language: str, collector: tuple[Collector, str]
) -> None:
    received, base = collector
    service = f"{language}-example"
    async with sdk_plugin(
        language,
        OTEL_EXPORTER_OTLP_ENDPOINT=base,
        OTEL_SERVICE_NAME=service,
        OTEL_BSP_SCHEDULE_DELAY="50",  # ms: send spans soon, not after the default 5 s
    ) as address:
        async with Dispatcher(sdk_manifest(address, base)) as dispatcher:
            result = await dispatcher.call(
                "example", "echo", {"text": "traced"}, request_id="req-traced"
            )
            with pytest.raises(PluginError):
                await dispatcher.call("example", "fail", {"message": "no"})
        assert result == {"text": "traced"}
        await until(
            lambda: len([s for s in received.spans if s.service == service]) == 2,
            f"the {language} plugin's two spans",
        )

    (attempt,) = received.named("example.echo attempt")
    (in_plugin,) = received.named("linchkit.plugin/echo")
    assert in_plugin.trace_id == attempt.trace_id
    assert in_plugin.parent_span_id == attempt.span_id
    assert in_plugin.service == service
    assert in_plugin.kind == trace.SpanKind.SERVER.value + 1  # OTLP's enum counts from UNSPECIFIED
    assert in_plugin.attributes["linchkit.method"] == "echo"
    assert in_plugin.attributes["linchkit.plugin"] == "example"
    assert in_plugin.attributes["linchkit.request_id"] == "req-traced"
    assert in_plugin.attributes["linchkit.outcome"] == "ok"

    (failed_attempt,) = received.named("example.fail attempt")
    (failed,) = received.named("linchkit.plugin/fail")
    assert failed.parent_span_id == failed_attempt.span_id
    assert failed.attributes["linchkit.outcome"] == "ExampleFailure"
    assert failed.attributes["error.type"] == "ExampleFailure"
    assert failed.attributes["linchkit.plugin"] == "example"
    assert failed.status == (2, "no")  # ERROR, with the error's message
    assert in_plugin.status[0] != 2


@pytest.mark.parametrize("language", SDK_LANGUAGES)
async def test_an_sdk_plugin_starts_a_new_trace_for_a_malformed_traceparent(
    language: str, collector: tuple[Collector, str]
) -> None:
    # The dispatcher untraced passes the caller's traceparent through as it came.
    received, base = collector
    async with sdk_plugin(
        language, OTEL_EXPORTER_OTLP_ENDPOINT=base, OTEL_BSP_SCHEDULE_DELAY="50"
    ) as address:
        async with Dispatcher(sdk_manifest(address, None)) as dispatcher:
            for traceparent in TRACEPARENT_MALFORMED:
                result = await dispatcher.call("example", "echo", {"n": 1}, traceparent=traceparent)
                assert result == {"n": 1}
        await until(
            lambda: len(received.named("linchkit.plugin/echo")) == len(TRACEPARENT_MALFORMED),
            f"the {language} plugin's spans",
        )
    spans = received.named("linchkit.plugin/echo")
    assert all(span.parent_span_id == "" for span in spans), "roots of new traces"
    assert len({span.trace_id for span in spans}) == len(TRACEPARENT_MALFORMED)
    assert "0" * 32 not in {span.trace_id for span in spans}


@pytest.mark.parametrize("language", SDK_LANGUAGES)
async def test_an_sdk_plugin_without_otel_variables_exports_nothing(
    language: str, collector: tuple[Collector, str]
) -> None:
    # The collector listens and the dispatcher sends it its spans; the plugin, told of no
    # endpoint, sends none, not even when it stops (when a traced one flushes).
    received, base = collector
    async with (
        sdk_plugin(language) as address,
        Dispatcher(sdk_manifest(address, base)) as dispatcher,
    ):
        assert await dispatcher.call("example", "echo", {"n": 1}) == {"n": 1}
    await until(lambda: received.named("example.echo attempt"), "the dispatcher's spans")
    assert {span.service for span in received.spans} == {"the-dispatcher"}


# OTEL_TRACES_SAMPLER(_ARG) as OpenTelemetry's SDKs read it: a call without a parent, one
# whose parent was sampled and one whose parent was not, each by its request id; and the
# calls whose span reaches the collector. A parent-based sampler follows the parent's flag
# and asks its root sampler only for a call without one; the others never look at it. An
# unknown sampler is parentbased_always_on, an argument that is no ratio 1.0 (with a
# warning, in every SDK: tests/conformance/test_collector_and_sampler_lines.py).
SAMPLED_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
UNSAMPLED_PARENT = "00-5cf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
SAMPLER_CALLS = {"root": None, "sampled": SAMPLED_PARENT, "unsampled": UNSAMPLED_PARENT}
SAMPLER_CASES: dict[str, tuple[dict[str, str], set[str]]] = {
    "always_off": ({"OTEL_TRACES_SAMPLER": "always_off"}, set()),
    "traceidratio-0": (
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
        set(),
    ),
    "always_on": ({"OTEL_TRACES_SAMPLER": "always_on"}, {"root", "sampled", "unsampled"}),
    "parentbased_always_on": (
        {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
        {"root", "sampled"},
    ),
    "parentbased_traceidratio-0": (
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
        {"sampled"},
    ),
    "unknown-sampler": ({"OTEL_TRACES_SAMPLER": "sometimes"}, {"root", "sampled"}),
    "traceidratio-not-a-ratio": (
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "lots"},
        {"root", "sampled", "unsampled"},
    ),
}


@pytest.mark.parametrize("case", SAMPLER_CASES)
@pytest.mark.parametrize("language", SDK_LANGUAGES)
async def test_an_sdk_plugin_samples_as_otel_traces_sampler_says(
    language: str, case: str, collector: tuple[Collector, str]
) -> None:
    sampler, traced = SAMPLER_CASES[case]
    received, base = collector
    # The dispatcher untraced passes each caller's traceparent through as it came.
    async with (
        sdk_plugin(
            language, OTEL_EXPORTER_OTLP_ENDPOINT=base, OTEL_BSP_SCHEDULE_DELAY="50", **sampler
        ) as address,
        Dispatcher(sdk_manifest(address, None)) as dispatcher,
    ):
        for request_id, traceparent in SAMPLER_CALLS.items():
            result = await dispatcher.call(
                "example", "echo", {"n": 1}, request_id=request_id, traceparent=traceparent
            )
            assert result == {"n": 1}
    # Stopped (SIGTERM, and waited for): every SDK sends the spans it buffered first.
    spans = received.named("linchkit.plugin/echo")
    assert {span.attributes["linchkit.request_id"] for span in spans} == traced
    assert len(spans) == len(traced)
    for span in spans:
        parent = SAMPLER_CALLS[span.attributes["linchkit.request_id"]]
        if parent is not None:
            assert (span.trace_id, span.parent_span_id) == tuple(parent.split("-")[1:3])


# Every SDK sends spans as http/protobuf only when OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL asks
# for grpc, and says so once at start (docs/observability.md): Java, Rust and TypeScript in
# one wording, Python and Go in another.
GRPC_WARNING = (
    "OTEL_EXPORTER_OTLP_PROTOCOL is 'grpc', but this SDK sends spans as http/protobuf only"
)
GRPC_NAMED = "OTEL_EXPORTER_OTLP_PROTOCOL names a protocol this SDK does not send"
PROTOCOL_WARNINGS = {
    "java": GRPC_WARNING,
    "rust": GRPC_WARNING,
    "typescript": GRPC_WARNING,
    "python": GRPC_NAMED,
    "go": GRPC_NAMED,
}


@pytest.mark.parametrize("language", PROTOCOL_WARNINGS)
async def test_an_sdk_plugin_asked_for_grpc_says_so_once_and_sends_http_protobuf(
    language: str, collector: tuple[Collector, str]
) -> None:
    received, base = collector
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | {
        "OTEL_EXPORTER_OTLP_ENDPOINT": base,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    process, address = await start_service(executable(language), env, asyncio.subprocess.PIPE)
    try:
        async with Dispatcher(sdk_manifest(address, None)) as dispatcher:
            for n in range(3):
                assert await dispatcher.call("example", "echo", {"n": n}) == {"n": n}
    finally:
        await stop_service(process)
    assert process.stderr is not None
    said = (await process.stderr.read()).decode(errors="replace")
    assert said.count(PROTOCOL_WARNINGS[language]) == 1, said
    assert base.split("://", 1)[1].split("/", 1)[0] in said, "it names the collector"
    assert len(received.named("linchkit.plugin/echo")) == 3, "sent as http/protobuf all the same"


# -- the example plugin over WebSocket -------------------------------------------------------
# `serve --websocket` dialled by a `provider: websocket` target, or `connect` dialling the
# gateway of an inbound one. The dispatcher is untraced: it passes the caller's traceparent
# on as it came, so the plugin's span is the child of the span that traceparent names.

WEBSOCKET_CASES = [
    ("typescript", "serve --websocket"),
    ("typescript", "connect"),
    ("go", "serve --websocket"),
    ("go", "connect"),
    ("rust", "serve --websocket"),
    ("rust", "connect"),
    ("java", "serve --websocket"),
    ("java", "connect"),
]
WEBSOCKET_IDS = [f"{language}-{mode}" for language, mode in WEBSOCKET_CASES]
WS_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
WS_PARENT_ID = "00f067aa0ba902b7"
WS_TRACEPARENT = f"00-{WS_TRACE_ID}-{WS_PARENT_ID}-01"


def websocket_manifest(target: dict[str, Any]) -> Any:
    return parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "example",
                    "version": "1.0.0",
                    "target": target,
                    "defaults": {"timeout_ms": 20_000},
                    "methods": {"echo": {}, "fail": {}, "count": {}},
                }
            ],
        },
        base_dir=ROOT,
    )


@asynccontextmanager
async def websocket_sdk_plugin(language: str, mode: str, **otel: str) -> AsyncIterator[Dispatcher]:
    """The example plugin of ``language`` over WebSocket (``mode``) with ``otel`` (and no
    other ``OTEL_*`` variable), and an untraced dispatcher in front of it; the plugin
    stopped (SIGTERM, which flushes its spans) on leaving."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | otel
    if mode == "connect":
        inbound = {"provider": "websocket", "mode": "inbound", "token": INBOUND_TOKEN}
        async with (
            Dispatcher(websocket_manifest(inbound)) as dispatcher,
            # Its env is added to ours: the OTEL_* variables of ours are emptied.
            _dialling_in(
                executable(language),
                dispatcher,
                config={},
                env={k: "" for k in os.environ if k.startswith("OTEL_")} | otel,
            ),
        ):
            yield dispatcher
        return
    process, _, target = await start_websocket_service(executable(language), config={}, env=env)
    try:
        async with Dispatcher(websocket_manifest(target)) as dispatcher:
            yield dispatcher
    finally:
        await stop_service(process)


@pytest.mark.parametrize(("language", "mode"), WEBSOCKET_CASES, ids=WEBSOCKET_IDS)
async def test_an_sdk_plugin_over_websocket_traces_its_calls_and_streams(
    language: str, mode: str, collector: tuple[Collector, str]
) -> None:
    received, base = collector
    service = f"{language}-websocket"
    async with websocket_sdk_plugin(
        language,
        mode,
        OTEL_EXPORTER_OTLP_ENDPOINT=base,
        OTEL_SERVICE_NAME=service,
        OTEL_BSP_SCHEDULE_DELAY="50",
    ) as dispatcher:
        assert await dispatcher.call(
            "example", "echo", {"n": 1}, request_id="ws-call", traceparent=WS_TRACEPARENT
        ) == {"n": 1}
        chunks = [
            chunk
            async for chunk in dispatcher.stream(
                "example", "count", {"n": 3}, request_id="ws-stream", traceparent=WS_TRACEPARENT
            )
        ]
        assert chunks == [{"i": 0}, {"i": 1}, {"i": 2}]
        with pytest.raises(PluginError):
            await dispatcher.call(
                "example", "fail", {"message": "no"}, request_id="ws-fail", traceparent="garbage"
            )
        await until(lambda: len(received.spans) == 3, f"the {language} {mode} plugin's spans")

    assert {span.service for span in received.spans} == {service}
    assert {span.kind for span in received.spans} == {trace.SpanKind.SERVER.value + 1}
    assert {span.attributes["linchkit.plugin"] for span in received.spans} == {"example"}
    by_request = {span.attributes["linchkit.request_id"]: span for span in received.spans}
    for request_id, method in (("ws-call", "echo"), ("ws-stream", "count")):
        span = by_request[request_id]
        assert (span.name, span.trace_id, span.parent_span_id) == (
            f"linchkit.plugin/{method}",
            WS_TRACE_ID,
            WS_PARENT_ID,
        )
        assert span.attributes["linchkit.method"] == method
        assert span.attributes["linchkit.outcome"] == "ok"
        assert "error.type" not in span.attributes
        assert span.status[0] != 2
    failed = by_request["ws-fail"]
    assert (failed.name, failed.parent_span_id) == ("linchkit.plugin/fail", "")
    assert failed.trace_id not in (WS_TRACE_ID, "0" * 32)
    assert failed.attributes["linchkit.outcome"] == "ExampleFailure"
    assert failed.attributes["error.type"] == "ExampleFailure"
    assert failed.status == (2, "no")


@pytest.mark.parametrize(("language", "mode"), WEBSOCKET_CASES, ids=WEBSOCKET_IDS)
async def test_an_sdk_plugin_over_websocket_without_otel_variables_exports_nothing(
    language: str, mode: str, collector: tuple[Collector, str]
) -> None:
    received, _ = collector
    async with websocket_sdk_plugin(language, mode) as dispatcher:
        assert await dispatcher.call("example", "echo", {"n": 1}, traceparent=WS_TRACEPARENT) == {
            "n": 1
        }
        assert [
            chunk
            async for chunk in dispatcher.stream(
                "example", "count", {"n": 1}, traceparent=WS_TRACEPARENT
            )
        ] == [{"i": 0}]
    # Stopped: a traced plugin would have flushed by now.
    assert received.requests == 0
