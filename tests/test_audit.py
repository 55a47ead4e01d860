"""The audit log: one record per call under load, the chain and every kind of tampering,
several processes appending to one log, and a log whose end is damaged."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from dispatcher import Dispatcher
from dispatcher.audit import GENESIS, AuditLog, AuditLogError, verify, verify_lines
from dispatcher.audit import chain as audit_chain
from dispatcher.audit import log as audit_log
from dispatcher.audit.chain import check_chain
from dispatcher.cli import main
from dispatcher.config import ManifestError, parse_manifest
from dispatcher.identity import Credentials, Principal, api_key_digest
from linchkit_plugin.errors import DispatchError, Overloaded
from tests.conftest import LOCAL_TARGET, ROOT, echo_plugin

API_KEY = "lk_audit_" + "c0ffee" * 6
TALKER = Principal("alice", frozenset({"talker"}), "library")
STRANGER = Principal("mallory", frozenset({"nobody"}))


def audited_manifest(tmp_path: Path, path: str = "audit.log", **audit: Any) -> Any:
    plugin = echo_plugin("echo", LOCAL_TARGET)
    plugin["methods"]["say"] = {"audit_params": True}
    return parse_manifest(
        {
            "version": 1,
            "plugins": [plugin],
            "auth": {
                "api_keys": [
                    {"principal": "svc", "sha256": api_key_digest(API_KEY), "roles": ["talker"]}
                ]
            },
            "access": {"roles": {"talker": {"allow": ["echo.*"]}}},
            "audit": {"path": path, **audit},
        },
        base_dir=tmp_path,
    )


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_exactly_one_record_per_call_under_a_thousand_concurrent_mixed_calls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    kinds = [
        "ok",
        "plugin_error",
        "forbidden",
        "unauthorized",
        "deadline_exceeded",
        "invalid_params",
    ]
    plan = [kinds[index % len(kinds)] for index in range(1000)]

    async def one(index: int, kind: str, dispatcher: Dispatcher) -> str:
        request_id = f"req-{index}"
        try:
            if kind == "ok":
                await dispatcher.call(
                    "echo", "say", {"text": f"t{index}"}, caller=TALKER, request_id=request_id
                )
            elif kind == "plugin_error":
                await dispatcher.call(
                    "echo", "withdraw", {"amount": 500}, caller=TALKER, request_id=request_id
                )
            elif kind == "forbidden":
                await dispatcher.call(
                    "echo", "say", {"text": "x"}, caller=STRANGER, request_id=request_id
                )
            elif kind == "unauthorized":
                await dispatcher.call(
                    "echo",
                    "say",
                    {"text": "x"},
                    credentials=Credentials(api_key="bad" + API_KEY),
                    request_id=request_id,
                )
            elif kind == "deadline_exceeded":
                await dispatcher.call(
                    "echo",
                    "sleep",
                    {"seconds": 5},
                    caller=TALKER,
                    timeout=0.05,
                    request_id=request_id,
                )
            else:
                await dispatcher.call(
                    "echo", "say", {"wrong": 1}, caller=TALKER, request_id=request_id
                )
        except DispatchError as error:
            return error.type
        return "ok"

    async with Dispatcher(audited_manifest(tmp_path)) as dispatcher:
        outcomes = await asyncio.gather(*(one(i, kind, dispatcher) for i, kind in enumerate(plan)))
    # The head of what the log wrote: a record is sealed when it is written (after the
    # file's last line then), so the last ones are in it once the log has closed.
    head = dispatcher.stats()["audit"]["head"]
    assert outcomes == plan
    log = tmp_path / "audit.log"
    written = records(log)
    assert len(written) == 1000
    by_request = collections.Counter(record["request_id"] for record in written)
    assert set(by_request) == {f"req-{i}" for i in range(1000)} and set(by_request.values()) == {1}
    for record in written:
        index = int(record["request_id"].removeprefix("req-"))
        assert record["outcome"] == plan[index]
        assert record["plugin"] == "echo" and record["duration_ms"] >= 0
    say = [r for r in written if r["outcome"] == "ok"]
    assert say[0]["params"]["text"].startswith("t") and say[0]["principal"] == {
        "id": "alice",
        "proven_by": "library",
    }
    assert say[0]["instance"] == "local echo_plugin:EchoPlugin" or say[0]["instance"]
    assert all("params" not in r for r in written if r["method"] != "say")
    assert all(
        r["error_type"] == "InsufficientFunds" for r in written if r["outcome"] == "plugin_error"
    )
    assert all(r["principal"] is None for r in written if r["outcome"] == "unauthorized")
    report = verify(log, head=head)
    assert (report.intact, report.records) == (True, 1000), report
    # No secret anywhere: not in the log, not in any log line of the run.
    text = log.read_text()
    assert API_KEY not in text and api_key_digest(API_KEY) not in text
    assert all(API_KEY not in record.getMessage() for record in caplog.records)


async def test_refusals_while_draining_and_calls_by_credentials_are_recorded(
    tmp_path: Path,
) -> None:
    async with Dispatcher(audited_manifest(tmp_path)) as dispatcher:
        await dispatcher.call(
            "echo",
            "say",
            {"text": "x"},
            credentials=Credentials(api_key=API_KEY),
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        await dispatcher.drain(1.0)
        with pytest.raises(DispatchError, match="draining"):
            await dispatcher.call("echo", "say", {"text": "x"}, caller=TALKER)
    first, refused = records(tmp_path / "audit.log")
    assert first["principal"] == {"id": "svc", "proven_by": "api_key"}
    assert first["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert refused["outcome"] == "shutting_down"


async def test_the_chain_continues_across_restarts_and_a_cut_log_is_not_appended_to(
    tmp_path: Path,
) -> None:
    for _ in range(2):
        async with Dispatcher(audited_manifest(tmp_path)) as dispatcher:
            for index in range(3):
                await dispatcher.call("echo", "say", {"text": str(index)}, caller=TALKER)
    log = tmp_path / "audit.log"
    assert verify(log).records == 6 and verify(log).intact
    assert records(log)[0]["prev"] == GENESIS and records(log)[3]["prev"] != GENESIS
    log.write_bytes(log.read_bytes()[:-10])
    with pytest.raises(AuditLogError, match="incomplete line"):
        async with Dispatcher(audited_manifest(tmp_path)):
            pass


async def test_a_named_pipe_is_written_for_its_reader_and_refused_at_start_without_one(
    tmp_path: Path,
) -> None:
    # A log shipper reading a named pipe: start used to hang, reading the pipe's "last
    # line" (waiting for a writer) or opening it (waiting for a reader).
    fifo = tmp_path / "audit.pipe"
    os.mkfifo(fifo)
    unread = Dispatcher(audited_manifest(tmp_path, "audit.pipe"))
    with pytest.raises(AuditLogError, match=r"named pipe.*no process reads it"):
        await asyncio.wait_for(unread.start(), 10)
    await unread.aclose()
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    taken = bytearray()

    def read() -> None:
        os.set_blocking(reader, True)
        while chunk := os.read(reader, 1 << 16):
            taken.extend(chunk)

    thread = threading.Thread(target=read, daemon=True)
    try:
        async with asyncio.timeout(10):
            async with Dispatcher(audited_manifest(tmp_path, "audit.pipe")) as dispatcher:
                thread.start()  # once the pipe has its writer (before, a read is its end)
                for index in range(3):
                    await dispatcher.call("echo", "say", {"text": str(index)}, caller=TALKER)
        thread.join(10)  # the dispatcher closed its end: the reader sees the end
    finally:
        os.close(reader)
    report = verify_lines(bytes(taken))
    assert report.intact and report.records == 3
    assert json.loads(bytes(taken).splitlines()[0])["prev"] == GENESIS


async def test_stdout_as_the_sink(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    async with Dispatcher(audited_manifest(tmp_path, "-")) as dispatcher:
        await dispatcher.call("echo", "say", {"text": "to stdout"}, caller=TALKER)
    out = capfd.readouterr().out.splitlines()
    assert len(out) == 1 and json.loads(out[0])["params"] == {"text": "to stdout"}


class _StalledSink:
    """A pipe whose reader stops reading (a log shipper that hangs): once its 64 KB are
    full, every ``write`` to it blocks. ``drain`` starts reading it to the end."""

    def __init__(self) -> None:
        self.read_end, write_end = os.pipe()
        self.buffer = os.fdopen(write_end, "wb")
        self.taken = bytearray()
        self._reader: threading.Thread | None = None

    def drain(self) -> None:
        def read() -> None:
            while chunk := os.read(self.read_end, 1 << 16):
                self.taken += chunk

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def close(self) -> None:
        self.buffer.close()
        if self._reader is not None:
            self._reader.join(10)
        os.close(self.read_end)


async def test_a_sink_that_stops_taking_records_gets_calls_refused_and_then_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, the queue took a record per call for as long as the sink hung, until
    # memory ran out. Now, past max_backlog, calls are refused (Overloaded, retryable),
    # and one sealed record in the chain says how many were. (The pipe holds ~160
    # records; 1,000 more wait in the queue before the first refusal.)
    sink = _StalledSink()
    monkeypatch.setattr(sys, "stdout", sink)
    answered = refused = 0
    try:
        async with Dispatcher(audited_manifest(tmp_path, "-", max_backlog=1000)) as dispatcher:
            for index in range(5000):
                try:
                    await dispatcher.call("echo", "say", {"text": f"t{index}"}, caller=TALKER)
                    answered += 1
                except Overloaded as error:
                    assert "behind its sink" in error.message and error.retryable
                    refused += 1
                    if refused == 7:
                        break
            stats = dispatcher.stats()["audit"]
            assert refused == 7 and stats["refused"] == 7 and stats["queued"] <= 1000
            sink.drain()
            for _ in range(500):  # the writer thread catches up
                if dispatcher.stats()["audit"]["queued"] < 1000:
                    break
                await asyncio.sleep(0.01)
            await dispatcher.call("echo", "say", {"text": "again"}, caller=TALKER)
            answered += 1
    finally:
        sink.close()
    data = bytes(sink.taken)
    report = verify_lines(data)
    counts = [record for record in map(json.loads, data.splitlines()) if record["kind"] != "call"]
    # Every answered call has its record, every refused one is counted, all in one chain.
    # (Mostly one count; two when the writer thread, starved on a busy machine, lagged
    # 1,000 records behind once before the pipe filled.)
    assert report.intact and report.records == answered + len(counts)
    assert {count["kind"] for count in counts} == {"audit_backlog"}
    assert sum(count["refused"] for count in counts) == 7


def test_a_backlog_bound_below_what_a_burst_queues_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"audit\.max_backlog.*greater than or equal to 1000"):
        audited_manifest(tmp_path, max_backlog=50)


async def test_closing_a_log_whose_sink_takes_nothing_does_not_hang(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sink = _StalledSink()
    monkeypatch.setattr(sys, "stdout", sink)
    log = AuditLog(None)
    log.open()
    writer = log._thread
    assert writer is not None
    for index in range(2000):  # far more than the pipe holds
        log.write({"kind": "call", "outcome": "ok", "n": index, "pad": "x" * 100})
    for _ in range(1000):  # until the writer took them all, and blocks writing them
        if not log.stats()["queued"]:
            break
        await asyncio.sleep(0.01)
    for index in range(2000, 2500):  # these wait behind the blocked write
        log.write({"kind": "call", "outcome": "ok", "n": index, "pad": "x" * 100})
    try:
        await asyncio.wait_for(log.aclose(timeout=0.3), 10)
        assert "records were not written" in caplog.text
    finally:
        sink.drain()  # the blocked write ends; the writer drops the rest and stops
        writer.join(10)
        sink.close()
    assert not writer.is_alive()
    assert sink.taken.count(b"\n") == 2000


# -- tampering --------------------------------------------------------------------------


async def sample_log(tmp_path: Path, count: int = 8) -> tuple[Path, str]:
    path = tmp_path / "sample.log"
    log = AuditLog(str(path))
    log.open()
    for index in range(count):
        log.write({"kind": "call", "plugin": "echo", "method": "say", "outcome": "ok", "n": index})
    await log.aclose()
    return path, log.head


def tamper(path: Path, change: str) -> None:
    lines = path.read_bytes().split(b"\n")[:-1]
    if change == "changed field":
        lines[3] = lines[3].replace(b'"outcome":"ok"', b'"outcome":"no"')
    elif change == "changed field, hash recomputed":
        from dispatcher.audit.chain import seal

        record = json.loads(lines[3])
        record.pop("hash")
        prev = record.pop("prev")
        record["outcome"] = "forged"
        lines[3] = seal(record, prev)
    elif change == "removed line":
        del lines[3]
    elif change == "removed first line":
        del lines[0]
    elif change == "reordered lines":
        lines[2], lines[5] = lines[5], lines[2]
    elif change == "inserted copy":
        lines.insert(4, lines[1])
    elif change == "appended forged line":
        lines.append(
            b'{"kind":"call","plugin":"echo","outcome":"ok","prev":"'
            + b"0" * 64
            + b'","hash":"'
            + b"f" * 64
            + b'"}'
        )
    elif change == "appended self-consistent line off the chain":
        from dispatcher.audit.chain import seal

        lines.append(seal({"kind": "call", "plugin": "echo", "outcome": "ok"}, "a" * 64))
    elif change == "truncated mid-line":
        path.write_bytes(path.read_bytes()[:-25])
        return
    path.write_bytes(b"\n".join(lines) + b"\n")


TAMPERING = {
    "changed field": 4,
    "changed field, hash recomputed": 5,
    "removed line": 4,
    "removed first line": 1,
    "reordered lines": 3,
    "inserted copy": 5,
    "appended forged line": 9,
    "appended self-consistent line off the chain": 9,
    "truncated mid-line": 8,
}


@pytest.mark.parametrize("change", sorted(TAMPERING))
async def test_verify_catches_each_kind_of_tampering(tmp_path: Path, change: str) -> None:
    path, _ = await sample_log(tmp_path)
    runner = CliRunner()
    intact = runner.invoke(main, ["audit", "verify", str(path)])
    assert intact.exit_code == 0 and "8 records, chain intact" in intact.output
    tamper(path, change)
    report = verify(path)
    assert not report.intact and report.bad_line == TAMPERING[change], report
    broken = runner.invoke(main, ["audit", "verify", str(path)])
    assert broken.exit_code == 1
    assert f"{path}:{TAMPERING[change]}:" in broken.output


async def test_records_cut_from_the_end_need_the_head_to_show(tmp_path: Path) -> None:
    path, head = await sample_log(tmp_path)
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:-2]))
    assert verify(path).intact  # the chain alone cannot tell
    result = CliRunner().invoke(main, ["audit", "verify", str(path), "--head", head])
    assert result.exit_code == 1 and "expected head" in result.output
    assert CliRunner().invoke(main, ["audit", "verify", str(tmp_path / "none.log")]).exit_code == 2


@pytest.mark.parametrize("change", [None, *sorted(TAMPERING)])
async def test_verify_finds_the_same_wherever_the_blocks_it_reads_end(
    tmp_path: Path, change: str | None
) -> None:
    # verify reads a block at a time: a line split across blocks, or a block ending just
    # at a line's end, must read as the whole file does.
    path, _ = await sample_log(tmp_path)
    if change is not None:
        tamper(path, change)
    data = path.read_bytes()
    whole = verify_lines(data)
    for size in (1, 2, 7, 64, 199, len(data) - 1, len(data)):
        blocks = [data[start : start + size] for start in range(0, len(data), size)]
        assert check_chain(blocks) == whole, size


def test_verify_checks_a_log_larger_than_memory_would_like_in_the_memory_of_a_line(
    tmp_path: Path,
) -> None:
    # It read the whole log, then split it: a 200 MB log took ~450 MB, and the audit log
    # of a long-running gateway only grows.
    from dispatcher.audit.chain import seal_batch

    path = tmp_path / "audit.log"
    bodies = [
        json.dumps({"kind": "call", "n": n, "pad": "x" * 10_000}).encode() for n in range(500)
    ]
    head = GENESIS
    with path.open("wb") as log:
        for _ in range(40):  # 20,000 records, ~200 MB
            lines, head = seal_batch(bodies, head)
            log.write(lines)
    code = (
        "import resource, sys\n"
        "from dispatcher.audit import verify\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"report = verify({str(path)!r}, head={head!r})\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(report.intact, report.records, grown // 1024)\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    intact, records, grown_mb = ran.stdout.split()
    assert (intact, records) == ("True", "20000"), ran.stderr
    assert int(grown_mb) < 50, f"verify grew by {grown_mb} MB for a 200 MB log"


def test_verify_gives_up_on_a_line_without_end() -> None:
    # /dev/zero (or a log whose tail a crash filled with NULs) was one line read for ever.
    report = verify("/dev/zero")
    assert (report.records, report.bad_line) == (0, 1)
    assert report.problem is not None and "longer than 1 MiB" in report.problem


async def test_verify_reads_a_pipe_and_gives_up_on_a_fifo_nobody_writes_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, head = await sample_log(tmp_path)
    fifo = tmp_path / "audit.pipe"
    os.mkfifo(fifo)
    # A writer that comes late: the pipe is read to its end, as `<(zcat audit.log.gz)` is.
    late = threading.Timer(0.3, lambda: fifo.write_bytes(path.read_bytes()))
    late.start()
    report = await asyncio.wait_for(asyncio.to_thread(verify, fifo, head=head), 20)
    late.join(10)
    assert report.intact and report.records == 8, report
    # Nobody writes: it opened the FIFO waiting for a writer for ever.
    monkeypatch.setattr(audit_chain, "PIPE_WAIT_SECONDS", 0.5)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.to_thread(verify, fifo), 20)
    result = CliRunner().invoke(main, ["audit", "verify", str(fifo)])
    assert result.exit_code == 2, result.output
    assert "cannot read: a pipe nobody wrote to within 0.5 s" in result.output, result.output
    with pytest.raises(IsADirectoryError):
        verify(tmp_path)


async def test_a_fleet_call_records_the_instance_that_answered(tmp_path: Path) -> None:
    from tests.test_fleet import HOSTS, Instance, serving

    async with serving(Instance(HOSTS[0]), Instance(HOSTS[1])) as instances:
        document = {
            "version": 1,
            "plugins": [
                {
                    "id": "fleet",
                    "version": "1.0.0",
                    "target": {
                        "provider": "http",
                        "instances": [{"url": instance.url} for instance in instances],
                        "balance": "round_robin",
                    },
                    "methods": {"say": {}},
                }
            ],
            "audit": {"path": "audit.log"},
        }
        async with Dispatcher(parse_manifest(document, base_dir=tmp_path)) as dispatcher:
            answers = [await dispatcher.call("fleet", "say", {}) for _ in range(6)]
    url_of = {instance.host: instance.url for instance in instances}
    written = records(tmp_path / "audit.log")
    assert set(answers) == {HOSTS[0], HOSTS[1]}
    for answer, record in zip(answers, written, strict=True):
        assert record["instance"] == f"http {url_of[answer]}/invoke"


# -- the command line --------------------------------------------------------------------


def audited_manifest_file(tmp_path: Path) -> Path:
    plugin = echo_plugin("echo", LOCAL_TARGET)
    plugin["methods"]["say"] = {"audit_params": True}
    document = {
        "version": 1,
        "plugins": [plugin],
        "auth": {
            "api_keys": [
                {"principal": "svc", "sha256": api_key_digest(API_KEY), "roles": ["talker"]}
            ]
        },
        "access": {"roles": {"talker": {"allow": ["echo.*"]}}},
        "audit": {"path": "audit.log"},
    }
    path = tmp_path / "plugins.yaml"
    path.write_text(json.dumps(document))  # JSON is YAML
    return path


def test_a_command_line_call_refuses_a_damaged_log_in_one_line_and_health_needs_none(
    tmp_path: Path,
) -> None:
    manifest = audited_manifest_file(tmp_path)
    log = tmp_path / "audit.log"
    log.write_bytes(b'{"time":"2026-12-03T10:00:00+00:00","ki')
    runner = CliRunner()
    call = runner.invoke(
        main, ["-m", str(manifest), "call", "echo.say", "-p", '{"text": "x"}'],
        env={"DISPATCHER_API_KEY": API_KEY},
    )  # fmt: skip
    assert call.exit_code == 2, call.output
    assert call.exception is None or isinstance(call.exception, SystemExit)
    assert call.stderr.strip().splitlines() == [
        f"error: the audit log {log} ends with an incomplete line; run 'dispatcher audit"
        f" verify {log}' and move it aside before the dispatcher appends to it"
    ]
    # A health probe is not a call: it records nothing, so it neither needs the log nor
    # stops at its damage (or at a file its user may not write).
    health = runner.invoke(main, ["-m", str(manifest), "health"])
    assert health.exit_code == 0, health.output
    assert log.read_bytes() == b'{"time":"2026-12-03T10:00:00+00:00","ki'


# -- several processes writing one log ---------------------------------------------------

#: A process that appends to the manifest's audit log: it starts its dispatcher, says
#: "ready", waits for a line on stdin, then makes COUNT calls, a few at a time, spread
#: over a second or so (so its writes fall between the other process's).
_WRITER = """
import asyncio, sys
from dispatcher import Dispatcher
from dispatcher.identity import Principal

async def main(manifest, name, count):
    caller = Principal("alice", frozenset({"talker"}), "library")
    async with Dispatcher.from_file(manifest) as dispatcher:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        for start in range(0, count, 4):
            await asyncio.gather(*(
                dispatcher.call("echo", "say", {"text": "x"}, caller=caller,
                                request_id=f"{name}-{index}")
                for index in range(start, min(start + 4, count))
            ))
            await asyncio.sleep(0.003)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'sdk' / 'python'}"}


async def test_two_processes_appending_to_one_log_keep_one_chain(tmp_path: Path) -> None:
    # Each process continued the chain from the last line it had read when it opened the
    # log: the first line the other wrote after that broke it ("does not follow the line
    # before it"), a false tamper report that a real forgery could hide among.
    manifest = audited_manifest_file(tmp_path)
    count = 400
    writers = []
    for name in ("first", "second"):
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WRITER, str(manifest), name, str(count),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=_environment(),
        )  # fmt: skip
        writers.append(writer)
    try:
        for writer in writers:
            assert writer.stdout is not None
            assert await asyncio.wait_for(writer.stdout.readline(), 60) == b"ready\n"
        for writer in writers:
            assert writer.stdin is not None
            writer.stdin.write(b"go\n")
            await writer.stdin.drain()
        for writer in writers:
            assert await asyncio.wait_for(writer.wait(), 120) == 0
    finally:
        for writer in writers:
            if writer.returncode is None:
                writer.kill()
                await writer.wait()
    log = tmp_path / "audit.log"
    written = [record["request_id"] for record in records(log)]
    assert sorted(written) == sorted(
        f"{name}-{index}" for name in ("first", "second") for index in range(count)
    )
    # Interleaved, not one process's records after the other's: the test tested something.
    switches = sum(a[:5] != b[:5] for a, b in itertools.pairwise(written))
    assert switches >= 4, switches
    report = verify(log)
    assert (report.intact, report.records) == (True, 2 * count), report
    result = CliRunner().invoke(main, ["audit", "verify", str(log)])
    assert result.exit_code == 0 and f"{2 * count} records, chain intact" in result.output


async def test_a_call_from_the_command_line_joins_the_chain_of_a_running_dispatcher(
    tmp_path: Path,
) -> None:
    # The report's case: `dispatcher call` from an operator's shell while the gateway
    # writes the same log. The call is audited (it is a call like any other), into the
    # one chain, after whatever the gateway wrote meanwhile.
    manifest = audited_manifest_file(tmp_path)
    async with Dispatcher.from_file(manifest) as dispatcher:
        stop = asyncio.Event()

        async def keep_calling() -> int:
            made = 0
            while not stop.is_set():
                await dispatcher.call("echo", "say", {"text": "gw"}, caller=TALKER)
                made += 1
                await asyncio.sleep(0.002)
            return made

        gateway = asyncio.create_task(keep_calling())
        for index in range(2):
            command = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dispatcher.cli", "-m", str(manifest),
                "call", "echo.say", "-p", json.dumps({"text": f"cli-{index}"}),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**_environment(), "DISPATCHER_API_KEY": API_KEY},
            )  # fmt: skip
            out, err = await asyncio.wait_for(command.communicate(), 60)
            assert command.returncode == 0, err.decode()
            assert json.loads(out)["text"] == f"cli-{index}"
        await asyncio.sleep(0.05)
        stop.set()
        made = await gateway
    log = tmp_path / "audit.log"
    written = records(log)
    from_cli = [r for r in written if r["principal"] == {"id": "svc", "proven_by": "api_key"}]
    assert [r["params"] for r in from_cli] == [{"text": "cli-0"}, {"text": "cli-1"}]
    assert written.index(from_cli[0]) > 0 and written.index(from_cli[1]) < len(written) - 1
    report = verify(log)
    assert (report.intact, report.records) == (True, made + 2), report


async def _until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within 10 s")


async def test_a_log_whose_end_is_damaged_while_running_waits_until_it_is_moved_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Another writer died mid-write: the file ends with half a line. Appending after it
    # would bury the damage under records that verify never reaches; the records wait
    # instead (the calls are answered), and go to a new log once the file is moved aside.
    monkeypatch.setattr(audit_log, "_RETRY_SECONDS", 0.05)
    log = tmp_path / "audit.log"
    async with Dispatcher(audited_manifest(tmp_path)) as dispatcher:

        def written() -> int:
            return int(dispatcher.stats()["audit"]["records"])

        await dispatcher.call("echo", "say", {"text": "before"}, caller=TALKER)
        await _until(lambda: written() == 1)
        with log.open("ab") as file:
            file.write(b'{"time":"2026-12-03T10:00:00+00:00","kind":"ca')
        for index in range(3):
            await dispatcher.call("echo", "say", {"text": f"after-{index}"}, caller=TALKER)
        await _until(lambda: dispatcher.stats()["audit"]["write_errors"] >= 2)
        assert log.read_bytes().endswith(b'"kind":"ca') and written() == 1
        assert "ends with an incomplete line" in caplog.text
        log.rename(tmp_path / "audit.damaged.log")
        await _until(lambda: written() == 4)
    damaged = verify(tmp_path / "audit.damaged.log")
    assert (damaged.records, damaged.bad_line) == (1, 2) and "incomplete" in str(damaged.problem)
    report = verify(log)
    assert (report.intact, report.records) == (True, 3), report
    assert [r["params"]["text"] for r in records(log)] == ["after-0", "after-1", "after-2"]
    assert records(log)[0]["prev"] == GENESIS


_FILE_SIZE_LIMITED = """
import asyncio, resource, sys
import dispatcher.audit.log as audit_log
from dispatcher.audit import AuditLog

audit_log._RETRY_SECONDS = 0.05

async def main(path, limit):
    log = AuditLog(path)
    log.open()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # the disk is full past it
    for index in range(200):
        log.write({"kind": "call", "n": index, "pad": "x" * 200})
        if index % 20 == 0:
            await asyncio.sleep(0.01)
    while log.write_errors < 3:
        await asyncio.sleep(0.01)
    with open(path, "rb") as file:
        data = file.read()
    print(len(data), data.endswith(b"\\n"), log.records, flush=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
    await log.aclose()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_a_write_the_disk_refuses_halfway_leaves_no_cut_line_and_loses_no_record(
    tmp_path: Path,
) -> None:
    # A file size limit (RLIMIT_FSIZE) stands in for a full disk: the write stops
    # mid-batch. It used to leave half a line in the log, drop the batch, and append the
    # next batches after the half line; now the half is cut off again and the batch
    # waits, written once there is space.
    log = tmp_path / "audit.log"
    limit = 20_000  # a few dozen records: the limit falls inside a batch
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FILE_SIZE_LIMITED, str(log), str(limit),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_environment(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(writer.communicate(), 60)
    assert writer.returncode == 0, err.decode()
    size, whole_lines, written = out.decode().split()
    assert int(size) <= limit and whole_lines == "True" and 0 < int(written) < 200
    assert b"File too large" in err  # logged once, with what the writer does about it
    report = verify(log)
    assert (report.intact, report.records) == (True, 200), report
    assert [record["n"] for record in records(log)] == list(range(200))


_LOCK_HOLDER = """
import fcntl, os, sys
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o640)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()  # until the test closes it
"""


async def test_a_writer_stuck_holding_the_lock_is_named_when_another_opens_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_log, "OPEN_LOCK_SECONDS", 0.3)
    path = tmp_path / "audit.log"
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _LOCK_HOLDER, str(path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"locked\n"
        log = AuditLog(str(path))
        with pytest.raises(AuditLogError, match=rf"locked by process {holder.pid} for over"):
            log.open()
        holder.stdin.close()
        assert await asyncio.wait_for(holder.wait(), 30) == 0
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
    log.open()  # the lock is free: the log opens
    log.write({"kind": "call", "outcome": "ok"})
    await log.aclose()
    assert verify(path).records == 1


_HALF_WRITTEN = """
import fcntl, os, sys, time
from dispatcher.audit.chain import line_hash, seal

# A writer caught mid-append: the lock held, half its line written. (A dispatcher's own
# write cannot be paused halfway; this process follows the same protocol, slowly.)
path = sys.argv[1]
with open(path, "rb") as file:
    last = file.read().splitlines()[-1]
line = seal({"kind": "call", "outcome": "ok", "n": "late"}, line_hash(last)) + b"\\n"
descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
fcntl.flock(descriptor, fcntl.LOCK_EX)
os.write(descriptor, line[:40])
print("half", flush=True)
time.sleep(0.5)
os.write(descriptor, line[40:])
fcntl.flock(descriptor, fcntl.LOCK_UN)
"""


async def test_verify_while_a_writer_appends_waits_for_its_line_to_end(tmp_path: Path) -> None:
    # verify read the file while a batch was being written: its end looked cut short,
    # one more false report. Now it reads what the file held when no append was under way.
    path, _ = await sample_log(tmp_path)
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HALF_WRITTEN, str(path),
        stdout=asyncio.subprocess.PIPE,
        env=_environment(),
    )  # fmt: skip
    try:
        assert writer.stdout is not None
        assert await asyncio.wait_for(writer.stdout.readline(), 30) == b"half\n"
        report = await asyncio.to_thread(verify, path)
        assert await asyncio.wait_for(writer.wait(), 30) == 0
    finally:
        if writer.returncode is None:
            writer.kill()
            await writer.wait()
    assert (report.intact, report.records) == (True, 9), report
