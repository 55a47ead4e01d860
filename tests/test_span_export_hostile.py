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
import re
import signal
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
from tests.conformance.conftest import _start_service, executable
from tests.services import CLEAN_ENVIRONMENT
from tests.test_telemetry import telemetry_manifest, traced
from tests.test_telemetry_tracing import sdk_manifest

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


def _redirecting_to(port: int) -> Any:
    """A collector's way of answering: every request a 307 to the collector at ``port``."""

    async def redirect(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, heads: list[bytes]
    ) -> None:
        while True:
            await _read_request(reader, heads)
            location = f"http://127.0.0.1:{port}/v1/traces"
            writer.write(
                f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\n"
                "Content-Length: 0\r\n\r\n".encode()
            )
            await writer.drain()

    return redirect


async def test_a_redirect_is_said_once_and_not_followed(serve: Any) -> None:
    elsewhere, heads_elsewhere = await serve(_answer_ok)
    port, heads = await serve(_redirecting_to(elsewhere))
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


# -- the Go and Java SDKs: their example plugins against the same collectors -------------

#: The SDKs whose example plugin (``sdk/<language>/dist/example-plugin``) is run here as a
#: gRPC service; their exporters are their own (``sdk/go/plugin/collector.go``,
#: ``sdk/java/.../Tracing.java``), read the same variables and are held to the same
#: collectors.
SDKS = ["go", "java"]
#: The SDKs that refuse a malformed variable of the export, serving untraced with one line
#: naming it (as Python's does); Java's ignores it with one warning naming it, its default
#: standing in (docs/observability.md, "Java plugins").
REFUSING = {"go"}
#: What a case's plugin may reach at most (VmHWM): the example plugin, its runtime and a
#: 64 KB answer; before, Go read 4 MB of an endless answer per batch, and Java's exporter
#: would hold all of it.
PEAK_MB = {"go": 150, "java": 600}
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def _example_exporting(
    language: str,
    env: dict[str, str],
    *,
    calls: int = 1,
    until: Callable[[int, str], bool] | None = None,
) -> tuple[str, int, int]:
    """The example plugin of ``language`` served over gRPC in ``env`` (beside a clean
    environment; its spans sent 100 ms after each call), ``calls`` calls with a
    ``traceparent`` through a dispatcher, after each until ``until(call, stderr)`` holds
    (``PATIENCE`` at most); then SIGTERM. Its stderr, exit status and peak memory (MB)."""
    environment = {k: v for k, v in CLEAN_ENVIRONMENT.items() if not k.startswith("OTEL_")}
    environment |= {
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_EXPORTER_OTLP_TIMEOUT": TIMEOUT_MS,
        "LINCHKIT_PLUGIN_STOP_GRACE_MS": "0",
        "LINCHKIT_PLUGIN_STOP_HOOKS_MS": "0",
    } | env
    process, address = await _start_service(
        executable(language), environment, asyncio.subprocess.PIPE
    )
    said: list[bytes] = []

    async def read_stderr() -> None:
        assert process.stderr is not None
        while chunk := await process.stderr.read(65536):
            said.append(chunk)

    reading = asyncio.create_task(read_stderr())
    peak = 0
    try:
        async with Dispatcher(sdk_manifest(address, None)) as dispatcher:
            for call in range(calls):
                result = await dispatcher.call(
                    "example", "echo", {"text": "traced"}, traceparent=TRACEPARENT
                )
                assert result == {"text": "traced"}
                deadline = time.monotonic() + PATIENCE
                while until is not None and time.monotonic() < deadline:
                    if until(call, b"".join(said).decode(errors="replace")):
                        break
                    await asyncio.sleep(0.05)
        peak = _peak_mb(process.pid)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            await process.wait()
            await reading
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        reading.cancel()
    return b"".join(said).decode(errors="replace"), process.returncode, peak


def _peak_mb(pid: int) -> int:
    """The peak of a process's memory (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) // 1024


#: How each SDK's lines carry their level: slog's text form (Go), the SDK's formatter (Java).
_LEVELLED = re.compile(r"^time=\S+ level=(DEBUG|INFO|WARN|ERROR) |^\S+ (FINE|INFO|WARNING|SEVERE) ")


def _unlevelled(said: str) -> list[str]:
    """The lines of a plugin's stderr that carry no level: a host would log each at INFO
    (before, OpenTelemetry's Go error handler wrote such a line for each failed batch)."""
    return [line for line in said.splitlines() if line.strip() and not _LEVELLED.match(line)]


def _lines_naming(said: str, port: int) -> list[str]:
    """The lines naming the collector at ``port``, but for the stop's: the spans it
    dropped, said by every SDK (tests/conformance/test_stop_with_a_silent_collector.py)."""
    return [
        line
        for line in said.splitlines()
        if f"127.0.0.1:{port}" in line and "spans dropped at the stop" not in line
    ]


@pytest.mark.toolchain
@pytest.mark.parametrize("language", SDKS)
async def test_an_sdk_cuts_an_endless_answer(serve: Any, language: str) -> None:
    port, heads = await serve(_endless_body)
    said, returncode, peak = await _example_exporting(
        language,
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces"},
        calls=2,
        until=lambda call, _: len(heads) > call,
    )
    # Each export ended (the next one was sent), the answer was not held in memory, and
    # at most one line says so: Go and Python take a 200 cut short as spans sent, Java's
    # exporter as a batch failed, an outage said once. Before, Go said each batch failed,
    # a plain line without a level.
    assert len(heads) >= 2, (heads, said)
    assert peak < PEAK_MB[language], (peak, said)
    assert returncode == 0 and len(_lines_naming(said, port)) <= 1, said
    assert not _unlevelled(said), said
    assert "OutOfMemory" not in said and "panic" not in said, said


@pytest.mark.toolchain
@pytest.mark.parametrize("language", SDKS)
async def test_an_sdk_s_export_ends_at_its_timeout_when_the_answer_drips(
    serve: Any, language: str
) -> None:
    port, heads = await serve(_dripped_headers)
    said, returncode, _ = await _example_exporting(
        language,
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces"},
        calls=2,
        until=lambda call, _: len(heads) > call,
    )
    assert len(heads) >= 2, (heads, said)
    assert returncode == 0, said
    assert len(_lines_naming(said, port)) <= 1, said  # the outage, said once
    assert not _unlevelled(said), said


@pytest.mark.toolchain
@pytest.mark.parametrize("language", SDKS)
async def test_an_sdk_never_prints_a_token_in_the_endpoint_s_query(language: str) -> None:
    closed = _closed_port()
    said, returncode, _ = await _example_exporting(
        language,
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{closed}/v1/traces?api_key={SECRET}"
        },
        calls=2,
        until=lambda _, said: f"127.0.0.1:{closed}" in said,
    )
    assert returncode == 0, said
    lines = _lines_naming(said, closed)
    # One line for the outage, naming the collector by scheme, host and port (before, Go's
    # OpenTelemetry printed a plain line for each batch, the collector's path in it).
    assert len(lines) == 1 and f"http://127.0.0.1:{closed}" in lines[0], said
    assert "/v1/traces" not in said and SECRET not in said and not _unlevelled(said), said


@pytest.mark.toolchain
@pytest.mark.parametrize("language", SDKS)
@pytest.mark.parametrize(
    "headers",
    [
        f"Authorization: Bearer {SECRET}",  # a colon for the '='
        f"authorization=Bearer%20{SECRET}%0D%0AX-Injected:%201",  # a CR LF, once decoded
    ],
)
async def test_an_sdk_never_prints_a_header_it_cannot_read(
    serve: Any, language: str, headers: str
) -> None:
    port, heads = await serve(_answer_ok)
    variable = "OTEL_EXPORTER_OTLP_HEADERS"
    said, returncode, _ = await _example_exporting(
        language,
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces",
            variable: headers,
        },
        until=lambda _, said: variable in said and (language in REFUSING or bool(heads)),
    )
    assert returncode == 0 and SECRET not in said, said
    lines = [line for line in said.splitlines() if variable in line]
    assert len(lines) == 1, said
    if language in REFUSING:
        assert "no span is sent" in lines[0] and not heads, said
    assert not any(b"X-Injected" in head for head in heads), heads


@pytest.mark.toolchain
@pytest.mark.parametrize("language", SDKS)
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_BSP_MAX_QUEUE_SIZE", "-5"),  # before, Go: the batch processor panicked
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "lots"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "nan"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "-1"),
    ],
)
async def test_an_sdk_says_a_malformed_export_variable_in_one_line(
    serve: Any, language: str, variable: str, value: str
) -> None:
    port, heads = await serve(_answer_ok)
    said, returncode, _ = await _example_exporting(
        language,
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces",
            variable: value,
        },
        until=lambda _, said: variable in said,
    )
    assert returncode == 0 and "panic" not in said and "Exception" not in said, said
    lines = [line for line in said.splitlines() if variable in line]
    assert len(lines) == 1, said
    if language in REFUSING:
        assert "no span is sent" in lines[0] and not heads, said


@pytest.mark.toolchain
@pytest.mark.parametrize("language", SDKS)
async def test_an_sdk_follows_no_redirect(serve: Any, language: str) -> None:
    elsewhere, heads_elsewhere = await serve(_answer_ok)
    port, heads = await serve(_redirecting_to(elsewhere))
    said, returncode, _ = await _example_exporting(
        language,
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": f"x-api-key={SECRET}",
        },
        calls=2,
        until=lambda call, _: len(heads) > call,
    )
    # Before, Go's client followed it, the token in the headers with it.
    assert len(heads) == 2 and not heads_elsewhere, (heads, heads_elsewhere, said)
    assert returncode == 0 and SECRET not in said, said
    assert len(_lines_naming(said, port)) == 1, said


@pytest.mark.toolchain
@pytest.mark.parametrize("language", SDKS)
async def test_an_sdk_says_an_outage_once_and_its_end_once(serve: Any, language: str) -> None:
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
    said, returncode, _ = await _example_exporting(
        language,
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces"},
        calls=5,
        until=lambda call, said: len(heads) > call and (call < 3 or "again" in said),
    )
    assert len(heads) == 5 and returncode == 0, (heads, said)
    lines = _lines_naming(said, port)
    assert len(lines) == 2 and "takes spans again" in lines[1], said
    assert "/v1/traces" not in said and not _unlevelled(said), said


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
