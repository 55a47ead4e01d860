"""Spans exported to a collector that misbehaves, or with ``OTEL_*`` variables that do.

Both the Python SDK (``linchkit_plugin.tracing.configure_from_env``, which every way it
serves a plugin calls) and the dispatcher (``telemetry.tracing``) export through
OpenTelemetry's OTLP/HTTP exporter, held to bounds by ``linchkit_plugin._span_export``
and ``linchkit_plugin._collector_session``. What was seen before them:

- a collector answering an endless body: the exporter held all of it in memory
  (gigabytes in seconds);
- a collector sending its answer a byte at a time: the exporter's thread waited for
  good (each byte reset the socket's timeout): no span was sent again, and a
  dispatcher's close waited 30 s on it;
- a token in the endpoint's query: printed by the exporter's warning whenever the
  collector could not be reached;
- an ``OTEL_EXPORTER_OTLP_HEADERS`` item OpenTelemetry cannot read (``Authorization:
  Bearer …``, with a colon): printed, token and all, by its parser's warning;
- a malformed ``OTEL_BSP_*`` value: the plugin (and ``dispatcher serve``) did not start,
  with a traceback, or logged one; a timeout of ``nan``, ``inf`` or ``-1``: one error
  line per batch, every span lost;
- a redirect: counted as spans sent, and said nowhere.

The plugin side runs in a subprocess (the SDK installs the process's one global tracer
provider), its memory capped so that an exporter reading without bound cannot take the
machine's; the dispatcher's in this process, with a provider of its own. The collectors
are TCP servers on 127.0.0.1 that answer as each case needs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Dispatcher
from dispatcher.config.telemetry import ResolvedTracing, TelemetryEnvironmentError, TracingSettings
from dispatcher.telemetry.tracing import Tracing
from linchkit_plugin._span_export import ExportSettingsError, read_export_settings
from tests.services import CLEAN_ENVIRONMENT
from tests.test_telemetry import telemetry_manifest, traced

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-span-token"
#: The exporter's timeout in these cases (seconds): each export ends within it.
TIMEOUT = 1.0
#: The same, as ``OTEL_EXPORTER_OTLP_TIMEOUT`` says it (milliseconds).
TIMEOUT_MS = str(round(TIMEOUT * 1000))
#: How long a case waits for an export that should end within ``TIMEOUT``; a slow, loaded
#: machine's slack, well short of "for good".
PATIENCE = 8.0

#: A collector's way of answering a connection: what it was sent goes in ``heads``.
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader, heads: list[bytes]) -> None:
    """One request: its head kept in ``heads``, its body read by Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    heads.append(head)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)


async def _endless_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, heads: list[bytes]
) -> None:
    await _read_request(reader, heads)
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * (1 << 20)
    framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    while True:
        writer.write(framed)
        await writer.drain()


async def _dripped_headers(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, heads: list[bytes]
) -> None:
    await _read_request(reader, heads)
    writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    while True:  # a byte well within the socket's timeout, for ever
        writer.write(b"z")
        await writer.drain()
        await asyncio.sleep(0.1)


async def _answer_ok(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, heads: list[bytes]
) -> None:
    while True:
        await _read_request(reader, heads)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[int, list[bytes]]]]]:
    """Start a collector answering with a handler: its port, and the heads of the
    requests it was sent (filled as they come)."""
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[Any]] = set()

    async def start(handler: Handler) -> tuple[int, list[bytes]]:
        heads: list[bytes] = []

        async def each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await handler(reader, writer, heads)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the exporter cut it: what these collectors are for
            finally:
                tasks.discard(task)
                writer.close()

        server = await asyncio.start_server(each, "127.0.0.1", 0)
        servers.append(server)
        return server.sockets[0].getsockname()[1], heads

    yield start
    for server in servers:
        server.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for server in servers:
        await server.wait_closed()


def _closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (one just bound and let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the plugin's side: configure_from_env in a process of its own ----------------------

#: Configures the SDK from the environment, ends one span per round and flushes it (the
#: batch processor's own thread never exports: its delay is long), each flush waited for
#: ``PATIENCE`` at most; prints what happened as JSON.
_PLUGIN = r"""
import json, os, resource, sys, threading, time
limit = 1536 * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from linchkit_plugin import tracing
from opentelemetry import trace
configured = tracing.configure_from_env(plugin_id="hostile")
flushes = []
if configured:
    tracer = trace.get_tracer("hostile")
    for each in range(int(sys.argv[1])):
        with tracer.start_as_current_span(f"span-{each}"):
            pass
        done = threading.Event()
        def flush():
            trace.get_tracer_provider().force_flush()
            done.set()
        threading.Thread(target=flush, daemon=True).start()
        began = time.monotonic()
        flushes.append(time.monotonic() - began if done.wait(float(sys.argv[2])) else None)
        if flushes[-1] is None:
            break
# The peak of this process's own memory (VmHWM), not ru_maxrss: Linux carries that over an
# exec from the process that forked it, and a pytest worker late in a full run is 700 MB.
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) // 1024
print(json.dumps({"configured": configured, "flushes": flushes, "peak_mb": peak}), flush=True)
os._exit(0)
"""


async def _plugin_exporting(env: dict[str, str], rounds: int = 1) -> tuple[dict[str, Any], str]:
    """What ``_PLUGIN`` printed, and its stderr, in ``env`` (beside a clean environment)."""
    environment = {k: v for k, v in CLEAN_ENVIRONMENT.items() if not k.startswith("OTEL_")}
    environment |= {
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python")]),
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
        "OTEL_EXPORTER_OTLP_TIMEOUT": TIMEOUT_MS,
    } | env
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _PLUGIN,
        str(rounds),
        str(PATIENCE),
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60 + rounds * PATIENCE):
        out, err = await process.communicate()
    said = err.decode(errors="replace")
    assert process.returncode == 0, said
    return json.loads(out), said


async def test_an_endless_answer_is_cut_not_held_in_memory(serve: Any) -> None:
    port, _ = await serve(_endless_body)
    outcome, said = await _plugin_exporting(
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces"}
    )
    assert outcome["configured"], said
    (took,) = outcome["flushes"]
    assert took is not None and took < PATIENCE, (outcome, said)
    # Python, OpenTelemetry and a 64 KB answer: well under 300 MB (before: over a GB, or
    # the memory cap's MemoryError).
    assert outcome["peak_mb"] < 300, outcome
    assert "MemoryError" not in said, said


async def test_an_answer_dripped_a_byte_at_a_time_ends_at_the_timeout_every_time(
    serve: Any,
) -> None:
    port, heads = await serve(_dripped_headers)
    outcome, said = await _plugin_exporting(
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces"}, rounds=2
    )
    # Each export ends (before: the first never did), and the next one is sent.
    assert len(outcome["flushes"]) == 2 and None not in outcome["flushes"], (outcome, said)
    assert len(heads) >= 2, heads
    assert "Traceback" not in said, said


async def test_a_token_in_the_endpoint_s_query_never_prints() -> None:
    # Nothing listens there: the outage is said, naming the collector (and the exporter
    # tries again within its 3 s).
    closed = _closed_port()
    outcome, said = await _plugin_exporting(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{closed}/v1/traces?api_key={SECRET}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "3000",
        }
    )
    assert outcome["configured"], said
    assert f"http://127.0.0.1:{closed}" in said, said
    assert SECRET not in said, said


@pytest.mark.parametrize(
    "headers",
    [
        f"Authorization: Bearer {SECRET}",  # a colon for the '='
        f"authorization=Bearer {SECRET};x",  # ';' is in no header value OpenTelemetry reads
        f"authorization=Bearer%20{SECRET}%0D%0AX-Injected:%201",  # a CR LF, once decoded
    ],
)
async def test_a_header_opentelemetry_cannot_read_never_prints(serve: Any, headers: str) -> None:
    port, heads = await serve(_answer_ok)
    outcome, said = await _plugin_exporting(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces",
            "OTEL_EXPORTER_OTLP_HEADERS": headers,
        }
    )
    assert SECRET not in said, said
    assert not outcome["configured"], said
    lines = [line for line in said.splitlines() if "OTEL_EXPORTER_OTLP_HEADERS" in line]
    assert len(lines) == 1 and "no span is sent" in lines[0], said
    assert not any(b"X-Injected" in head for head in heads), heads


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_BSP_MAX_QUEUE_SIZE", "-5"),  # before: a ValueError traceback, no start
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "lots"),  # before: a traceback logged
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "nan"),  # before: an error line per batch
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "-1"),
    ],
)
async def test_a_malformed_export_variable_is_one_line_naming_it(
    serve: Any, variable: str, value: str
) -> None:
    port, _ = await serve(_answer_ok)
    outcome, said = await _plugin_exporting(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces",
            variable: value,
        }
    )
    assert "Traceback" not in said, said
    assert not outcome["configured"], said
    (line,) = [line for line in said.splitlines() if line.strip()]
    assert variable in line and "no span is sent" in line, said


async def test_a_redirect_is_said_once_and_not_followed(serve: Any) -> None:
    elsewhere, heads_elsewhere = await serve(_answer_ok)

    async def redirect(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, heads: list[bytes]
    ) -> None:
        while True:
            await _read_request(reader, heads)
            location = f"http://127.0.0.1:{elsewhere}/v1/traces"
            writer.write(
                f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\n"
                "Content-Length: 0\r\n\r\n".encode()
            )
            await writer.drain()

    port, heads = await serve(redirect)
    outcome, said = await _plugin_exporting(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": f"x-api-key={SECRET}",
        },
        rounds=2,
    )
    assert None not in outcome["flushes"], (outcome, said)
    assert len(heads) == 2 and not heads_elsewhere, (heads, heads_elsewhere)
    lines = [line for line in said.splitlines() if "redirect" in line]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], said
    assert SECRET not in said, said


async def test_an_outage_is_said_once_and_its_end_once(serve: Any) -> None:
    # Before: OpenTelemetry's line for every failed batch (a busy plugin: 16 a second
    # while a collector answered 500).
    answers = [500, 500, 500]  # then 200s (not 503 nor 429: those may be retried)

    async def failing_then_fine(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, heads: list[bytes]
    ) -> None:
        while True:
            await _read_request(reader, heads)
            status = answers.pop(0) if answers else 200
            writer.write(b"HTTP/1.1 %d Whatever\r\nContent-Length: 0\r\n\r\n" % status)
            await writer.drain()

    port, heads = await serve(failing_then_fine)
    outcome, said = await _plugin_exporting(
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces"}, rounds=5
    )
    assert None not in outcome["flushes"], (outcome, said)
    assert len(heads) == 5, heads
    lines = said.splitlines()
    assert len(lines) == 2, said
    assert "not reaching the trace collector" in lines[0] and "500" in lines[0], said
    assert lines[1].endswith(f"the trace collector at http://127.0.0.1:{port} takes spans again")


async def test_a_collector_that_answers_still_gets_every_span(serve: Any) -> None:
    port, heads = await serve(_answer_ok)
    outcome, said = await _plugin_exporting(
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces"}, rounds=3
    )
    assert len(outcome["flushes"]) == 3 and None not in outcome["flushes"], (outcome, said)
    assert len(heads) == 3 and all(b"POST /v1/traces" in head for head in heads), heads
    assert said == "", said


# -- the dispatcher's side -----------------------------------------------------------------


def _tracing(endpoint: str, environ: dict[str, str]) -> Tracing:
    settings = TracingSettings(otlp_endpoint=endpoint, headers={"x-api-key": SECRET})
    resolved = settings.resolved(environ)
    assert resolved is not None
    return Tracing(resolved)


async def test_the_dispatcher_s_close_is_not_held_by_a_dripping_collector(serve: Any) -> None:
    port, heads = await serve(_dripped_headers)
    environ = {"OTEL_EXPORTER_OTLP_TIMEOUT": TIMEOUT_MS, "OTEL_BSP_SCHEDULE_DELAY": "600000"}
    tracing = _tracing(f"http://127.0.0.1:{port}/v1/traces", environ)
    tracing.tracer.start_span("buffered").end()
    began = time.monotonic()
    async with asyncio.timeout(60):
        await asyncio.to_thread(tracing.shutdown)
    # The last export ends at its timeout (before: the batch processor's 30 s wait).
    assert time.monotonic() - began < PATIENCE
    assert heads


async def _held(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, heads: list[bytes]
) -> None:
    """A collector that takes each request and never answers."""
    await _read_request(reader, heads)
    await asyncio.Event().wait()


async def test_the_dispatcher_s_close_gives_the_spans_the_exporter_s_timeout_at_most(
    serve: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A collector that never answers, and spans for many batches buffered at the close:
    # each batch took the exporter's timeout, one after another, until OpenTelemetry's
    # batch processor stopped waiting for them (30 s).
    port, heads = await serve(_held)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", TIMEOUT_MS)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")
    endpoint = f"http://u:{SECRET}@127.0.0.1:{port}/v1/traces"
    dispatcher = Dispatcher(telemetry_manifest({"tracing": {"otlp_endpoint": endpoint}}, traced()))
    await dispatcher.start()
    assert dispatcher.telemetry is not None and dispatcher.telemetry.tracing is not None
    for each in range(50):
        dispatcher.telemetry.tracing.tracer.start_span(f"buffered-{each}").end()
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dispatcher"):
        async with asyncio.timeout(60):
            await dispatcher.aclose()
    assert time.monotonic() - began < TIMEOUT + PATIENCE
    (line,) = [each.getMessage() for each in caplog.records if "spans dropped" in each.getMessage()]
    assert f"http://127.0.0.1:{port}" in line and SECRET not in line, line
    assert heads  # it was sent to


async def test_the_dispatcher_never_prints_a_token_in_the_endpoint_s_query(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed = _closed_port()
    # Time for a retry: the outage is said once, naming the collector.
    environ = {"OTEL_EXPORTER_OTLP_TIMEOUT": "3000", "OTEL_BSP_SCHEDULE_DELAY": "600000"}
    tracing = _tracing(f"http://127.0.0.1:{closed}/v1/traces?api_key={SECRET}", environ)
    tracing.tracer.start_span("buffered").end()
    with caplog.at_level(logging.WARNING):
        async with asyncio.timeout(60):
            await asyncio.to_thread(tracing.shutdown)
    said = "\n".join(record.getMessage() for record in caplog.records)
    assert f"http://127.0.0.1:{closed}" in said, said  # the failure was said
    assert SECRET not in said, said


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_BSP_SCHEDULE_DELAY", "soon"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096"),  # over the queue's 2048
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "inf"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0"),
    ],
)
def test_the_dispatcher_refuses_a_malformed_export_variable_naming_it(
    variable: str, value: str
) -> None:
    # Before: accepted here, then a ValueError traceback when the tracing started (or
    # one logged, or an error line per batch).
    settings = TracingSettings(otlp_endpoint="http://127.0.0.1:4318/v1/traces")
    with pytest.raises(TelemetryEnvironmentError) as refused:
        settings.resolved({variable: value})
    assert refused.value.variable == variable


def test_export_settings_default_to_opentelemetry_s_and_follow_the_variables() -> None:
    assert read_export_settings({}) == read_export_settings({"OTEL_BSP_SCHEDULE_DELAY": ""})
    settings = read_export_settings(
        {"OTEL_EXPORTER_OTLP_TIMEOUT": "2500", "OTEL_BSP_MAX_QUEUE_SIZE": "100"}
    )
    assert settings.timeout == 2.5
    # A queue under the batch size OpenTelemetry defaults to: batches of the queue.
    assert (settings.max_queue_size, settings.max_export_batch_size) == (100, 100)
    # The traces' own variable wins, as in the exporter.
    both = {"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "3000", "OTEL_EXPORTER_OTLP_TIMEOUT": "x"}
    assert read_export_settings(both).timeout == 3.0
    with pytest.raises(ExportSettingsError) as refused:
        read_export_settings({"OTEL_EXPORTER_OTLP_HEADERS": f"a=1,Authorization: {SECRET}"})
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"]
)
def test_the_export_timeout_is_read_in_milliseconds_as_every_sdk_reads_it(variable: str) -> None:
    """OpenTelemetry's specification, and the Go, Rust, Java and TypeScript SDKs, read it in
    milliseconds; OpenTelemetry's Python exporter reads seconds, so the ``10000`` a fleet's
    operator sets for every plugin made a Python plugin (and the dispatcher) wait 2.8 hours
    for a collector that does not answer."""
    assert read_export_settings({variable: "10000"}).timeout == 10.0
    assert read_export_settings({variable: "250"}).timeout == 0.25
    resolved = TracingSettings(otlp_endpoint="http://127.0.0.1:4318/v1/traces").resolved(
        {variable: "10000"}
    )
    assert isinstance(resolved, ResolvedTracing)
    assert resolved.export.timeout == 10.0


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("X%0D%0AInjected=1", "a header's name, decoded, is not a token"),
        ("x%20key=v", "a header's name, decoded, is not a token"),
        ("x-key=v%C3%A9", "printable ASCII"),
        ("x-key=v%0D%0AX-Injected:%201", "printable ASCII"),
    ],
    ids=["name_crlf", "name_space", "value_utf8", "value_crlf"],
)
def test_a_header_decoded_into_what_no_header_carries_is_refused(value: str, problem: str) -> None:
    """OpenTelemetry decodes a header's name as well as its value: ``X%0D%0AInjected``
    passed the plugin's check (``%`` is a token character) and became a name holding CR LF
    once decoded; the dispatcher refused it with a copy of the rules of its own."""
    with pytest.raises(ExportSettingsError) as refused:
        read_export_settings({"OTEL_EXPORTER_OTLP_HEADERS": value})
    assert problem in refused.value.reason
    assert "Injected" not in refused.value.reason and "%" not in refused.value.reason


def test_resolved_tracing_carries_the_export_settings() -> None:
    resolved = TracingSettings(otlp_endpoint="http://127.0.0.1:4318/v1/traces").resolved(
        {"OTEL_EXPORTER_OTLP_TIMEOUT": "4000"}
    )
    assert isinstance(resolved, ResolvedTracing)
    assert resolved.export.timeout == 4.0
