"""`dispatcher bench`: a load on one method through the manifest's policies, run as a user
runs it (the real command, the real example plugin), its figures checked against what the
load must have produced."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from dispatcher.cli._load import Latencies
from tests.conftest import ROOT
from tests.gateway_support import answering_every_request

BIN = Path(sys.executable).parent


def echo_plugin(**methods: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "echo",
        "version": "1.0.0",
        "target": {
            "provider": "local",
            "entrypoint": "echo_plugin:EchoPlugin",
            "path": str(ROOT / "examples" / "python"),
        },
        "methods": methods or {"say": {}},
    }


def manifest(folder: Path, plugin: dict[str, Any]) -> Path:
    path = folder / "plugins.yaml"
    path.write_text(json.dumps({"version": 1, "plugins": [plugin]}))
    return path


def bench(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dispatcher"), "-m", str(path), "bench", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def figures(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(result.stdout)
    return decoded


def test_a_closed_loop_makes_exactly_the_calls_asked_and_times_each(tmp_path: Path) -> None:
    path = manifest(tmp_path, echo_plugin())
    result = bench(path, "echo.say", "-p", '{"text": "hi"}', "-n", "300", "-c", "8", "-o", "json")
    assert result.returncode == 0, result.stderr
    report = figures(result)
    assert (report["calls"], report["succeeded"], report["failed"]) == (300, 300, 0)
    assert report["errors"] == {} and report["not_started"] == 0
    assert report["concurrency"] == 8 and report["warmup_calls"] == 8
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert report["calls_per_s"] > 0 and report["cpu_us_per_call"] > 0
    assert report["first_call_ms"] > 0 and report["start_ms"] > 0
    assert "echo.say: measuring 300 calls" in result.stderr


def test_the_table_says_what_the_run_measured(tmp_path: Path) -> None:
    path = manifest(tmp_path, echo_plugin())
    result = bench(path, "echo.say", "-p", '{"text": "hi"}', "-n", "50")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["echo.say", "closed", "loop,", "concurrency", "16"]
    assert any(line.startswith("calls ") and "50 in" in line for line in lines)
    assert any(line.startswith("succeeded ") and "50 (100.00%)" in line for line in lines)
    assert any(line.startswith("latency (ms)") and "p99.9" in line for line in lines)


def test_failed_calls_are_counted_by_type_and_the_load_goes_on(tmp_path: Path) -> None:
    limited = {"rate_limit": {"rate": 20, "burst": 5, "mode": "reject"}}
    path = manifest(tmp_path, echo_plugin(say=limited))
    result = bench(
        path, "echo.say", "-p", '{"text": "hi"}', "-n", "200", "-c", "4", "--warmup", "0",
        "-o", "json",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    report = figures(result)
    assert report["calls"] == 200
    limited_calls = report["errors"]["rate_limited"]
    # The first call took one unit of the burst of 5; the 200 calls take well under a
    # second, in which the bucket refills by at most ~20 more.
    assert 4 <= report["succeeded"] <= 4 + 20
    assert limited_calls["count"] == 200 - report["succeeded"]
    assert limited_calls["retryable"] is True
    assert "over its limit" in limited_calls["message"]


def test_a_method_that_fails_at_once_is_reported_as_dispatcher_call_reports_it(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, echo_plugin())
    result = bench(path, "echo.shout", "-n", "10")
    assert result.returncode == 1
    assert result.stdout == ""
    error = json.loads(result.stderr.strip().splitlines()[-1])["error"]
    assert error["type"] == "method_not_found"


def test_an_open_loop_keeps_its_rate_when_the_method_keeps_up(tmp_path: Path) -> None:
    """Every call due is started, on time. A process the machine starves for a while
    rightly counts the calls it could not start (93 of 100 once, at a load of 12 on two
    cores): the second of three runs is asked for then, and one of them must be whole."""
    path = manifest(tmp_path, echo_plugin())
    reports = []
    for _ in range(3):
        result = bench(
            path, "echo.say", "-p", '{"text": "hi"}', "--rate", "100", "-d", "1", "-c", "4",
            "-o", "json",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        report = figures(result)
        assert report["calls"] + report["not_started"] == 100, report
        assert 0.98 <= report["seconds"] < 1.5  # paced: the last call is due at 0.99 s
        if report["not_started"] == 0:
            return
        reports.append(report)
    pytest.fail(f"calls were not started in three runs: {reports}")


def test_an_open_loop_counts_the_wait_of_a_method_that_cannot_keep_up(tmp_path: Path) -> None:
    path = manifest(tmp_path, echo_plugin(sleep={}))
    result = bench(
        path, "echo.sleep", "-p", '{"seconds": 0.05}', "--rate", "200", "-d", "1", "-c", "2",
        "--warmup", "0", "-o", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = figures(result)
    # Two callers of a 50 ms method make at most ~40 calls a second, not 200: the rest fell
    # due and were never started, and each call made is timed from when it was due.
    assert report["calls"] <= 45
    assert report["not_started"] == 200 - report["calls"]
    assert report["latency_ms"]["p90"] > 300
    assert report["seconds"] < 1.5  # the duration ends the run, not the backlog


def test_params_from_a_file_are_sent_in_turn(tmp_path: Path) -> None:
    cached = {"pure": True, "cache": {"ttl_ms": 60_000}}
    path = manifest(tmp_path, echo_plugin(say=cached))
    lines = tmp_path / "params.jsonl"
    lines.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n')
    result = bench(
        path, "echo.say", "--params-file", str(lines), "-n", "30", "-c", "1", "--warmup", "0",
        "-o", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # The first call stored "a"; the 30 measured ones cycle a, b, c: b and c miss once.
    assert figures(result)["cache"] == {"hits": 28, "misses": 2, "coalesced": 0}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["echo"], "expected PLUGIN.METHOD"),
        (["echo.say", "-p", "{nope"], "--params is not valid JSON"),
        (["echo.say", "-c", "0"], "--concurrency"),
        (["echo.say", "-c", "10001"], "--concurrency"),
        (["echo.say", "--rate", "0"], "--rate"),
        (["echo.say", "--rate", "nan"], "--rate"),
        (["echo.say", "--rate", "inf"], "--rate"),
        (["echo.say", "-n", "0"], "--calls"),
        (["echo.say", "-d", "-1"], "--duration"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path: Path, args: list[str], says: str) -> None:
    result = bench(manifest(tmp_path, echo_plugin()), *args)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_a_params_file_that_is_not_json_lines_is_a_usage_error(tmp_path: Path) -> None:
    path = manifest(tmp_path, echo_plugin())
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    for file, says in ((broken, "line 2: not valid JSON"), (empty, "has no params")):
        result = bench(path, "echo.say", "--params-file", str(file))
        assert result.returncode == 2 and says in result.stderr, result.stderr
    both = bench(path, "echo.say", "-p", "{}", "--params-file", str(broken))
    assert both.returncode == 2 and "not both" in both.stderr
    # A file without end: it was read for ever, a line at a time that never ended.
    endless = bench(path, "echo.say", "--params-file", "/dev/zero")
    assert endless.returncode == 2 and "larger than 256 MiB" in endless.stderr, endless.stderr


def _started(path: Path, *args: str) -> subprocess.Popen[str]:
    """`dispatcher bench` in the background, once it says it is measuring."""
    process = subprocess.Popen(
        [str(BIN / "dispatcher"), "-m", str(path), "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    line = process.stderr.readline()
    assert "measuring" in line, line
    return process


def test_ctrl_c_stops_starting_calls_and_reports_what_was_measured(tmp_path: Path) -> None:
    path = manifest(tmp_path, echo_plugin(sleep={}))
    process = _started(
        path, "echo.sleep", "-p", '{"seconds": 0.3}', "-d", "60", "-c", "4", "--warmup", "0",
        "-o", "json",
    )  # fmt: skip
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    report = json.loads(stdout)
    assert report["interrupted"] is True
    assert report["failed"] == 0 and report["succeeded"] >= 4  # those in flight ended
    assert report["seconds"] < 10
    assert "stopping: waiting for the calls in flight" in stderr


def test_ctrl_c_stops_a_run_of_a_method_that_answers_at_once(tmp_path: Path) -> None:
    # An in-process method that never suspends its caller: the signal's handler never ran,
    # and the run went on for its whole duration (a week, at most), then exited 0.
    path = manifest(tmp_path, echo_plugin())
    process = _started(
        path, "echo.say", "-p", '{"text": "x"}', "-d", "600", "--warmup", "0", "-o", "json"
    )
    time.sleep(0.5)
    interrupted = time.monotonic()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert time.monotonic() - interrupted < 20
    report = json.loads(stdout)
    assert report["interrupted"] is True and report["succeeded"] > 0


def test_a_second_ctrl_c_abandons_the_calls_in_flight(tmp_path: Path) -> None:
    path = manifest(tmp_path, echo_plugin(sleep={"timeout_ms": 60_000}))
    # The first call (made before measuring) is short; every measured one takes 30 s.
    params = tmp_path / "params.jsonl"
    params.write_text('{"seconds": 0.01}\n{"seconds": 30}\n')
    process = _started(
        path, "echo.sleep", "--params-file", str(params), "-d", "60", "-c", "2",
        "--warmup", "0",
    )  # fmt: skip
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 130, stderr
    assert "abandoned" in stderr and stdout == ""  # nothing measured is claimed
    assert "Traceback" not in stderr


def test_latency_percentiles_are_within_their_bucket_of_the_exact_ones() -> None:
    spread = random.Random(7)
    exact = sorted(int(spread.lognormvariate(13, 1.5)) for _ in range(50_000))
    latencies = Latencies()
    for each in exact:
        latencies.add(each)
    for percent in (1, 50, 90, 99, 99.9):
        nearest_rank = exact[math.ceil(percent / 100 * len(exact)) - 1]
        assert abs(latencies.percentile(percent) - nearest_rank) <= nearest_rank / 64 + 1
    assert latencies.percentile(100) == exact[-1]
    # A run of any length keeps a few hundred buckets, not a number per call.
    assert len(latencies._buckets) < 1_000
    assert Latencies().percentile(50) == 0


def test_a_method_that_never_answers_ends_the_run_at_its_deadline(tmp_path: Path) -> None:
    path = manifest(tmp_path, echo_plugin(sleep={"timeout_ms": 300}))
    params = tmp_path / "params.jsonl"
    params.write_text('{"seconds": 0}\n{"seconds": 600}\n')  # the first call must answer
    began = time.monotonic()
    result = bench(
        path, "echo.sleep", "--params-file", str(params), "-d", "1", "-c", "1", "--warmup", "0",
        "-o", "json",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    report = figures(result)
    # One caller, alternating: an instant call, then one cut at 300 ms, for 1 s.
    assert report["errors"]["deadline_exceeded"]["count"] == report["calls"] // 2
    assert report["succeeded"] == report["calls"] - report["calls"] // 2
    assert report["latency_ms"]["max"] < 1_000
    assert time.monotonic() - began < 30


# -- through a running gateway --------------------------------------------------------------

BENCH_KEY = "bench-key-0123456789abcdef"


async def _serve(folder: Path) -> tuple[asyncio.subprocess.Process, str]:
    """`dispatcher serve` of the echo plugin with an API key (the real authenticator)."""
    entry = echo_plugin(say={}, withdraw={"rate_limit": {"rate": 20, "burst": 5, "mode": "reject"}})
    key = {"principal": "bench", "sha256": hashlib.sha256(BENCH_KEY.encode()).hexdigest()}
    path = folder / "gateway.yaml"
    path.write_text(json.dumps({"version": 1, "plugins": [entry], "auth": {"api_keys": [key]}}))
    process = await asyncio.create_subprocess_exec(
        str(BIN / "dispatcher"), "-m", str(path), "serve", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    assert line.startswith("listening on http://127.0.0.1:"), line
    return process, line.split()[-1]


async def _bench(*args: str, key: str | None = BENCH_KEY) -> tuple[int, str, str]:
    environment = {**os.environ}
    environment.pop("DISPATCHER_API_KEY", None)
    if key is not None:
        environment["DISPATCHER_API_KEY"] = key
    process = await asyncio.create_subprocess_exec(
        str(BIN / "dispatcher"), "bench", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_through_a_gateway_calls_are_counted_as_a_caller_in_another_language_sees_them(
    tmp_path: Path,
) -> None:
    process, url = await _serve(tmp_path)
    try:
        code, stdout, stderr = await _bench(
            "echo.say", "-p", '{"text": "hi"}', "-n", "300", "-c", "8", "--gateway", url,
            "-o", "json",
        )  # fmt: skip
        assert code == 0, stderr
        report = json.loads(stdout)
        assert (report["calls"], report["succeeded"], report["start_ms"]) == (300, 300, None)
        # The gateway's 429 envelopes are counted by their type, as in process.
        code, stdout, stderr = await _bench(
            "echo.withdraw", "-p", '{"amount": 1}', "-n", "100", "--warmup", "0",
            "--gateway", url, "-o", "json",
        )  # fmt: skip
        assert code == 1, stderr
        report = json.loads(stdout)
        assert report["errors"]["rate_limited"]["count"] == 100 - report["succeeded"]
        assert 4 <= report["succeeded"] <= 24
        # A wrong key fails the first call: nothing is measured.
        code, stdout, stderr = await _bench("echo.say", "-n", "5", "--gateway", url, key="wrong")
        assert code == 1 and stdout == ""
        assert json.loads(stderr.strip().splitlines()[-1])["error"]["type"] == "unauthorized"
        assert "wrong" not in stderr  # the key is not echoed back
        # A key pasted with its line break (it was a traceback: a header cannot hold one)
        # goes without it; any other control character is refused, the key not shown.
        code, stdout, stderr = await _bench(
            "echo.say", "-p", '{"text": "hi"}', "-n", "5", "--gateway", url, "-o", "json",
            key=BENCH_KEY + "\r\n",
        )  # fmt: skip
        assert code == 0 and json.loads(stdout)["succeeded"] == 5, stderr
        code, stdout, stderr = await _bench("echo.say", "--gateway", url, key="secret\x1bkey")
        assert code == 2 and "Traceback" not in stderr, stderr
        assert "control character (from DISPATCHER_API_KEY)" in stderr, stderr
        assert "secret" not in stderr
    finally:
        process.terminate()
        await process.wait()


async def test_a_gateway_that_does_not_answer_envelopes_is_a_provider_error(
    tmp_path: Path,
) -> None:
    async def not_a_gateway(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/html"):
            return web.Response(text="<html>maintenance</html>", content_type="text/html")
        endless = web.StreamResponse()  # no Content-Length, no end
        await endless.prepare(request)
        chunk = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            while True:
                await endless.write(chunk)
        return endless

    app = web.Application()
    app.router.add_post("/v1/plugins/{plugin}/methods/{method}", not_a_gateway)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        for method, says in (("html", "without a call's envelope"), ("endless", "over")):
            code, stdout, stderr = await _bench(
                f"echo.{method}", "-n", "3", "--gateway", f"http://127.0.0.1:{port}"
            )
            assert code == 1 and stdout == "", stderr
            error = json.loads(stderr.strip().splitlines()[-1])["error"]
            assert error["type"] == "provider_error" and says in error["message"]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:1", "127.0.0.1:8080", "http://h:1/?q=1"])
def test_a_gateway_url_that_is_not_one_is_a_usage_error(tmp_path: Path, url: str) -> None:
    result = bench(manifest(tmp_path, echo_plugin()), "echo.say", "--gateway", url)
    assert result.returncode == 2 and "--gateway" in result.stderr, result.stderr


def test_without_timeout_a_gateway_call_waits_as_long_as_a_method_may_run() -> None:
    """The gateway ends a call at the method's ``timeout_ms`` (a day at most) and says so;
    without ``--timeout`` the client keeps only a safety net beyond that. Before, it gave
    up after 60 s, failing every call of a method allowed longer as deadline_exceeded."""
    from pydantic import ValidationError

    from dispatcher.cli._gateway_client import DEFAULT_CLIENT_SECONDS
    from dispatcher.config.policies import Policies

    Policies(timeout_ms=86_400_000)  # the longest a method may run
    with pytest.raises(ValidationError):
        Policies(timeout_ms=86_400_001)
    assert DEFAULT_CLIENT_SECONDS > 86_400


async def test_a_first_call_that_goes_unanswered_is_said_while_bench_waits(
    tmp_path: Path,
) -> None:
    """A gateway that takes the connection and never answers: bench was silent for as long
    as the call's bound (a day without --timeout). Now it says it waits, once, and ends
    at --timeout as any call does."""

    async def silent(request: web.Request) -> web.StreamResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with answering_every_request(silent) as url:
        began = time.monotonic()
        code, stdout, stderr = await _bench(
            "echo.say", "-n", "1", "--timeout", "6", "--gateway", url
        )
    assert code == 1 and stdout == "", stderr
    notice = "echo.say: the first call has not answered in 5 s; waiting"
    assert stderr.count(notice) == 1, stderr
    assert json.loads(stderr.strip().splitlines()[-1])["error"]["type"] == "deadline_exceeded"
    assert time.monotonic() - began < 60
