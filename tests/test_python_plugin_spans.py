"""The Python SDK's span of each call: the scheme of every SDK, in every way it serves.

Each call runs in a ``SERVER`` span ``linchkit.plugin/<method>`` with ``linchkit.method``,
``linchkit.plugin``, ``linchkit.request_id`` and ``linchkit.outcome`` (``ok`` or the wire
error type; ``error.type`` and an error status on failure), continuing the call's
``traceparent`` or, without a valid one, the root of a new trace (``linchkit_plugin.tracing``).
Before, the Python SDK named it ``<Class>.<method>``, had neither ``linchkit.plugin`` nor
``linchkit.outcome``, set ``error.type`` to the exception's class and made no span at all
without a ``traceparent``: a fleet's traces searched by span name or outcome missed its
Python plugins.

The first half runs the example plugin in every way the SDK serves one, exporting to an
OTLP receiver in the test; the second holds ``PluginHost`` to the details in-process, with
a tracer provider of the test's own (``PluginHost(tracer_provider=…)``), never the global
one another test would share.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dispatcher import Dispatcher, PluginError, parse_manifest
from linchkit_plugin import PluginHost
from linchkit_plugin.errors import DeadlineExceeded, InvalidParams, MethodNotFound
from tests.conformance.conftest import INBOUND_TOKEN, _dialling_in, executable
from tests.conformance.conftest import _start_service as start_service
from tests.conformance.conftest import _start_websocket_service as start_websocket_service
from tests.conformance.conftest import _stop_service as stop_service
from tests.conftest import ROOT
from tests.services import free_port
from tests.test_telemetry_tracing import Collector, ReceivedSpan, until
from tests.test_telemetry_tracing import collector as collector  # the fixture

#: This checkout's dispatcher and SDK, whichever the virtualenv installed.
SOURCE_PATH = os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python")])
PYTHON_EXAMPLES = ROOT / "sdk" / "python" / "examples"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SERVER = trace.SpanKind.SERVER.value + 1  # OTLP's enum counts from UNSPECIFIED
PATIENCE = 60.0

# -- every way the SDK serves a plugin ------------------------------------------------------

#: The example executable's four modes (``grpc_server.main``, ``ws_server.main``) and the
#: three of ``dispatcher-plugin`` (HTTP, ``serve --websocket``, ``connect``).
MODES = (
    "executable grpc service",
    "executable subprocess",
    "executable websocket",
    "executable connect",
    "dispatcher-plugin serve",
    "dispatcher-plugin serve --websocket",
    "dispatcher-plugin connect",
)


def _plugin_environment(collector_base: str) -> dict[str, str]:
    """Ours without any ``OTEL_*``, plus the collector's: no ``OTEL_SERVICE_NAME``, so the
    spans' service is the plugin's id."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | {
        "PYTHONPATH": SOURCE_PATH,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector_base,
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms: send spans soon, not after the default 5 s
    }


def _manifest(target: dict[str, Any], plugin_id: str = "example") -> Any:
    return parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": plugin_id,
                    "version": "1.0.0",
                    "target": target,
                    "lifecycle": {"init_timeout_ms": int(PATIENCE * 1000)},
                    "defaults": {"timeout_ms": 20_000},
                    "methods": {"echo": {}, "fail": {}},
                }
            ],
        },
        base_dir=ROOT,
    )


def _cli(*arguments: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "linchkit_plugin.cli",
        *arguments[:1],
        "example_plugin:ExamplePlugin",
        "--path",
        str(PYTHON_EXAMPLES),
        *arguments[1:],
    ]


@asynccontextmanager
async def _listening(command: list[str], env: dict[str, str], said: str) -> AsyncIterator[str]:
    """``command`` running in ``env`` until it says ``said`` (a regex with one group, on
    stderr): yields that group; SIGTERM on leaving."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(PATIENCE):
            while not (
                found := re.search(said, line := (await process.stderr.readline()).decode())
            ):
                assert line, f"{command} exited before it said {said!r}"
        yield found.group(1)
    finally:
        await stop_service(process)


@asynccontextmanager
async def _serving(mode: str, env: dict[str, str], tmp_path: Path) -> AsyncIterator[Dispatcher]:
    """A dispatcher, without tracing of its own, calling the example plugin served so."""
    example = executable("python")
    if mode == "executable grpc service":
        process, address = await start_service(example, env)
        try:
            target = {"provider": "grpc", "address": address, "lifecycle": "dispatcher"}
            async with Dispatcher(_manifest(target)) as dispatcher:
                yield dispatcher
        finally:
            await stop_service(process)
    elif mode == "executable subprocess":
        target = {
            "provider": "subprocess",
            "command": [str(example)],
            "env": {k: v for k, v in env.items() if k.startswith(("OTEL_", "PYTHONPATH"))},
            "handshake_timeout_ms": int(PATIENCE * 1000),
        }
        async with Dispatcher(_manifest(target)) as dispatcher:
            yield dispatcher
    elif mode == "executable websocket":
        process, _, target = await start_websocket_service(example, config={}, env=env)
        try:
            async with Dispatcher(_manifest(target)) as dispatcher:
                yield dispatcher
        finally:
            await stop_service(process)
    elif mode in ("executable connect", "dispatcher-plugin connect"):
        if mode == "dispatcher-plugin connect":
            # Launched as the conformance suite launches an executable's connect mode.
            example = tmp_path / "connect-example"
            command = shlex.join(_cli("connect", "--id", "example", "--version", "1.0.0"))
            example.write_text(f'#!/bin/sh\nshift\nexec {command} "$@"\n')
            example.chmod(0o755)
        target = {"provider": "websocket", "mode": "inbound", "token": INBOUND_TOKEN}
        async with (
            Dispatcher(_manifest(target)) as dispatcher,
            _dialling_in(example, dispatcher, config={}, env=env),
        ):
            yield dispatcher
    elif mode == "dispatcher-plugin serve":
        port = free_port()
        command = _cli("serve", "--port", str(port))
        # LINCHKIT_PLUGIN_ID: the docker provider says so to the plugins it runs.
        async with _listening(command, env | {"LINCHKIT_PLUGIN_ID": "example"}, r"(listening)"):
            target = {"provider": "http", "url": f"http://127.0.0.1:{port}"}
            async with Dispatcher(_manifest(target)) as dispatcher:
                yield dispatcher
    elif mode == "dispatcher-plugin serve --websocket":
        command = _cli("serve", "--websocket", "--port", "0", "--id", "example")
        async with (
            _listening(command, env, r"listening on (ws://\S+)") as url,
            Dispatcher(_manifest({"provider": "websocket", "url": url})) as dispatcher,
        ):
            yield dispatcher
    else:
        raise AssertionError(mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_every_way_the_sdk_serves_names_and_parents_its_spans_as_every_sdk(
    mode: str, collector: tuple[Collector, str], tmp_path: Path
) -> None:
    received, base = collector
    async with _serving(mode, _plugin_environment(base), tmp_path) as dispatcher:
        continued = await dispatcher.call(
            "example", "echo", {"n": 1}, request_id="req-continued", traceparent=TRACEPARENT
        )
        assert continued == {"n": 1}
        assert await dispatcher.call("example", "echo", {"n": 2}, request_id="req-root") == {"n": 2}
        with pytest.raises(PluginError):
            await dispatcher.call("example", "fail", {"message": "no"}, request_id="req-fail")
        await until(lambda: len(_of(received)) == 3, f"the {mode} plugin's three spans")

    spans = _of(received)
    assert {span.service for span in spans} == {"example"}, "the plugin's id, as in Go"
    assert {span.kind for span in spans} == {SERVER}
    assert {span.attributes["linchkit.plugin"] for span in spans} == {"example"}
    assert {span.attributes["code.namespace"] for span in spans} == {"ExamplePlugin"}
    (traced,) = [s for s in spans if s.attributes["linchkit.request_id"] == "req-continued"]
    assert (traced.name, traced.trace_id, traced.parent_span_id) == (
        "linchkit.plugin/echo",
        TRACE_ID,
        PARENT_ID,
    )
    assert traced.attributes["linchkit.method"] == "echo"
    assert traced.attributes["linchkit.outcome"] == "ok"
    assert "error.type" not in traced.attributes
    (root,) = [s for s in spans if s.attributes["linchkit.request_id"] == "req-root"]
    assert (root.name, root.parent_span_id) == ("linchkit.plugin/echo", "")
    assert root.trace_id not in (TRACE_ID, "0" * 32)
    (failed,) = [s for s in spans if s.attributes["linchkit.request_id"] == "req-fail"]
    assert (failed.name, failed.parent_span_id) == ("linchkit.plugin/fail", "")
    assert failed.attributes["linchkit.outcome"] == "ExampleFailure"
    assert failed.attributes["error.type"] == "ExampleFailure"
    assert failed.status == (2, "no")


@pytest.mark.parametrize("websocket", [False, True], ids=["http", "websocket"])
async def test_dispatcher_plugin_serve_given_no_id_names_its_service_by_the_plugin_class(
    websocket: bool, collector: tuple[Collector, str]
) -> None:
    # No LINCHKIT_PLUGIN_ID, no --id, no OTEL_SERVICE_NAME, and a class without an ``id``:
    # the service is the name its WebSocket hello gives it, the class's, as the gRPC
    # executable's is the id it was built with; before, it was ``linchkit-plugin`` for all.
    # (A WebSocket target's manifest id is the one its hello says.)
    received, base = collector
    plugin_id = "ExamplePlugin" if websocket else "example"
    env = {k: v for k, v in _plugin_environment(base).items() if k != "LINCHKIT_PLUGIN_ID"}
    if websocket:
        command = _cli("serve", "--websocket", "--port", "0")
        said = r"listening on (ws://\S+)"
    else:
        port = free_port()
        command = _cli("serve", "--port", str(port))
        said = r"(listening)"
    async with _listening(command, env, said) as url:
        target = (
            {"provider": "websocket", "url": url}
            if websocket
            else {"provider": "http", "url": f"http://127.0.0.1:{port}"}
        )
        async with Dispatcher(_manifest(target, plugin_id)) as dispatcher:
            assert await dispatcher.call(plugin_id, "echo", {"n": 1}) == {"n": 1}
        await until(lambda: len(_of(received)) == 1, "the plugin's span")
    (span,) = _of(received)
    assert span.service == "ExamplePlugin"


def _of(received: Collector) -> list[ReceivedSpan]:
    return [span for span in received.spans if span.name.startswith("linchkit.plugin/")]


# -- PluginHost in-process ------------------------------------------------------------------


class Traced:
    """A plugin whose methods say which span is current while they run."""

    async def current(self) -> str:
        return f"{trace.get_current_span().get_span_context().span_id:016x}"

    def current_in_a_thread(self) -> str:
        return f"{trace.get_current_span().get_span_context().span_id:016x}"

    async def fail(self, message: str) -> None:
        raise LookupError(message)

    async def refuse(self) -> None:
        raise InvalidParams("no, not these")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def chunks(self, n: int) -> AsyncIterator[str]:
        for _ in range(n):
            yield f"{trace.get_current_span().get_span_context().span_id:016x}"


@pytest.fixture
def exported() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def host(exported: InMemorySpanExporter) -> AsyncIterator[PluginHost]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    # The author's own tracer is the global one, which this test cannot set (it is the
    # process's, once): the API's get_tracer falls back on a no-op, and still finds the
    # current span in the context.
    plugin_host = PluginHost(Traced(), plugin_id="traced", tracer_provider=provider)
    await plugin_host.open({})
    try:
        yield plugin_host
    finally:
        await plugin_host.close()
        provider.shutdown()


def _attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def _parent(span: ReadableSpan) -> str:
    return "" if span.parent is None else f"{span.parent.span_id:016x}"


async def test_a_call_runs_in_its_span_continuing_the_traceparent(
    host: PluginHost, exported: InMemorySpanExporter
) -> None:
    current = await host.call(
        "current", None, {"traceparent": TRACEPARENT, "request_id": "r" * 1000}
    )
    in_a_thread = await host.call("current_in_a_thread", None, {"traceparent": TRACEPARENT})
    span, threaded = exported.get_finished_spans()
    assert span.name == "linchkit.plugin/current"
    assert span.kind is trace.SpanKind.SERVER
    assert (f"{span.context.trace_id:032x}", _parent(span)) == (TRACE_ID, PARENT_ID)
    assert current == f"{span.context.span_id:016x}", "current while the method runs"
    assert in_a_thread == f"{threaded.context.span_id:016x}", "a sync method's thread too"
    assert _attributes(span) == {
        "linchkit.method": "current",
        "linchkit.plugin": "traced",
        "linchkit.request_id": "r" * 128,
        "linchkit.outcome": "ok",
        "code.namespace": "Traced",
    }
    assert span.status.status_code is trace.StatusCode.UNSET


@pytest.mark.parametrize(
    "traceparent",
    [None, "", "garbage", f"00-{'0' * 32}-{'0' * 16}-01", "x" * 100_000, 42, f"{TRACEPARENT}x"],
)
async def test_a_call_without_a_valid_traceparent_is_the_root_of_a_new_trace(
    host: PluginHost, exported: InMemorySpanExporter, traceparent: Any
) -> None:
    context = {} if traceparent is None else {"traceparent": traceparent}
    assert await host.call("current", None, context)
    assert await host.call("current", None, context)
    first, second = exported.get_finished_spans()
    assert (_parent(first), _parent(second)) == ("", "")
    assert first.context.trace_id != second.context.trace_id
    assert first.context.trace_id not in (0, int(TRACE_ID, 16))


async def test_the_plugin_s_own_spans_nest_under_the_call_s(
    exported: InMemorySpanExporter,
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))

    class Nesting:
        async def work(self) -> None:
            # What trace.get_tracer finds in a process whose plugin set up its provider.
            with provider.get_tracer("the-author").start_as_current_span("the author's own"):
                pass

    nesting = PluginHost(Nesting(), plugin_id="nesting", tracer_provider=provider)
    await nesting.call("work", None, {"traceparent": TRACEPARENT})
    own, call = exported.get_finished_spans()
    assert own.name == "the author's own"
    assert _parent(own) == f"{call.context.span_id:016x}"
    provider.shutdown()


@pytest.mark.parametrize(
    ("method", "params", "outcome", "message"),
    [
        ("fail", {"message": "x" * 2000}, "LookupError", "x" * 512),
        ("refuse", None, "invalid_params", "no, not these"),
        ("current", {"surplus": 1}, "invalid_params", None),
    ],
)
async def test_a_failed_call_records_the_error_type_the_caller_sees(
    host: PluginHost,
    exported: InMemorySpanExporter,
    method: str,
    params: Any,
    outcome: str,
    message: str | None,
) -> None:
    with pytest.raises(PluginError if outcome == "LookupError" else InvalidParams) as raised:
        await host.call(method, params, {})
    assert raised.value.to_wire()["type"] == outcome
    (span,) = exported.get_finished_spans()
    assert _attributes(span)["linchkit.outcome"] == outcome
    assert _attributes(span)["error.type"] == outcome
    assert span.status.status_code is trace.StatusCode.ERROR
    assert span.status.description == (message or raised.value.message[:512])


async def test_a_call_its_deadline_or_its_host_ends_is_deadline_exceeded(
    host: PluginHost, exported: InMemorySpanExporter
) -> None:
    with pytest.raises(DeadlineExceeded):
        await host.call_with_deadline("sleep", {"seconds": 30}, {}, 0.05)
    cancelled = asyncio.ensure_future(host.call("sleep", {"seconds": 30}, {}))
    await asyncio.sleep(0.05)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    late, gone = exported.get_finished_spans()
    for span in (late, gone):
        assert _attributes(span)["linchkit.outcome"] == "deadline_exceeded"
        assert _attributes(span)["error.type"] == "deadline_exceeded"
    assert gone.status.description == "the host cancelled the call"


async def test_a_method_the_plugin_lacks_has_no_span(
    host: PluginHost, exported: InMemorySpanExporter
) -> None:
    # Named by the caller: no span name, however many a caller makes up (as Go, TypeScript).
    for method in ("nope", "x" * 10_000):
        with pytest.raises(MethodNotFound):
            await host.call(method, None, {"traceparent": TRACEPARENT})
        with pytest.raises(MethodNotFound):
            await host.call_with_deadline(method, None, {}, 5)
    assert exported.get_finished_spans() == ()


async def test_a_stream_has_one_span_current_around_each_step(
    host: PluginHost, exported: InMemorySpanExporter
) -> None:
    chunks = [
        chunk async for chunk in host.stream("chunks", {"n": 3}, {"traceparent": TRACEPARENT})
    ]
    # Left early by its reader: the host ended it.
    left = host.stream("chunks", {"n": 3}, {})
    await anext(left)
    await left.aclose()
    whole, cut = exported.get_finished_spans()
    assert whole.name == "linchkit.plugin/chunks"
    assert _parent(whole) == PARENT_ID
    assert chunks == [f"{whole.context.span_id:016x}"] * 3
    assert _attributes(whole)["linchkit.outcome"] == "ok"
    assert _attributes(cut)["linchkit.outcome"] == "deadline_exceeded"
    assert trace.get_current_span() is trace.INVALID_SPAN, "not left current between steps"


async def test_a_host_given_no_id_names_the_one_the_envelope_carries(
    exported: InMemorySpanExporter,
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    anonymous = PluginHost(Traced(), tracer_provider=provider)
    await anonymous.call_with_deadline("current", None, {}, 5, plugin="from-the-envelope")
    await anonymous.call("current", None, {}, plugin="p" * 1000)
    await anonymous.call("current", None, {})
    named = PluginHost(Traced(), plugin_id="its-own", tracer_provider=provider)
    await named.call("current", None, {}, plugin="from-the-envelope")
    plugins = [_attributes(span)["linchkit.plugin"] for span in exported.get_finished_spans()]
    assert plugins == ["from-the-envelope", "p" * 128, "Traced", "its-own"]
    provider.shutdown()


async def test_a_host_that_starts_no_traces_only_joins_valid_ones(
    exported: InMemorySpanExporter,
) -> None:
    # As the dispatcher hosts plugins in its own process (provider: local).
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    hosted = PluginHost(Traced(), plugin_id="hosted", tracer_provider=provider, new_traces=False)
    await hosted.call("current", None, {})
    await hosted.call("current", None, {"traceparent": "garbage"})
    assert [c async for c in hosted.stream("chunks", {"n": 1}, {})]
    assert exported.get_finished_spans() == ()
    await hosted.call("current", None, {"traceparent": TRACEPARENT})
    (span,) = exported.get_finished_spans()
    assert _parent(span) == PARENT_ID
    provider.shutdown()


# -- untraced: nothing to pay --------------------------------------------------------------

UNTRACED = """
import asyncio, sys
from linchkit_plugin import PluginHost
from linchkit_plugin.tracing import configure_from_env

class Echo:
    async def say(self, text):
        return text

async def main():
    host = PluginHost(Echo())
    await host.open({})
    context = {"traceparent": sys.argv[1], "request_id": "r1"}
    assert await host.call("say", {"text": "hi"}, context) == "hi"
    assert [c async for c in host.stream("say", {"text": "hi"}, context)] == ["hi"]
    print("opentelemetry.trace" in sys.modules)

assert not configure_from_env()  # no OTEL_EXPORTER_OTLP_* variable
asyncio.run(main())
"""


def test_a_plugin_with_no_tracer_provider_never_loads_opentelemetry() -> None:
    # Before, a call that carried a traceparent imported OpenTelemetry and made a no-op
    # span (9.4 us of CPU a call instead of 1.0) in a plugin that exported nothing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    ran = subprocess.run(
        [sys.executable, "-c", UNTRACED, TRACEPARENT],
        env=env | {"PYTHONPATH": SOURCE_PATH},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["False"]


# -- hosted in the dispatcher's process ------------------------------------------------------

HOSTED = """
import asyncio, sys
import orjson
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from dispatcher import Dispatcher, parse_manifest

exported = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exported))
trace.set_tracer_provider(provider)  # the host application's own

manifest = parse_manifest({"version": 1, "plugins": [{
    "id": "greeter", "version": "1.0.0",
    "target": {"provider": "local", "entrypoint": "echo_plugin:EchoPlugin", "path": sys.argv[1]},
    "methods": {"say": {}},
}]})

async def main():
    async with Dispatcher(manifest) as dispatcher:
        await dispatcher.call("greeter", "say", {"text": "untraced"})
        await dispatcher.call("greeter", "say", {"text": "traced"}, traceparent=sys.argv[2])
    spans = [
        {"name": s.name, "parent": s.parent and f"{s.parent.span_id:016x}",
         "attributes": dict(s.attributes)}
        for s in exported.get_finished_spans()
    ]
    print(orjson.dumps(spans).decode())

asyncio.run(main())
"""


def test_a_plugin_hosted_in_the_dispatcher_s_process_joins_its_traces_as_its_manifest_id() -> None:
    from tests.conftest import EXAMPLES

    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    ran = subprocess.run(
        [sys.executable, "-c", HOSTED, str(EXAMPLES), TRACEPARENT],
        env=env | {"PYTHONPATH": SOURCE_PATH},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    # The dispatcher traces nothing here (no telemetry): the untraced call makes no span,
    # not a new trace per call; the caller's traceparent is joined, as the manifest's id.
    (span,) = orjson.loads(ran.stdout)
    assert span["name"] == "linchkit.plugin/say"
    assert span["parent"] == PARENT_ID
    assert span["attributes"]["linchkit.plugin"] == "greeter"
    assert span["attributes"]["code.namespace"] == "EchoPlugin"
