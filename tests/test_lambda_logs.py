"""``dispatcher logs`` for Lambda plugins: the local Lambda writes each invocation's output
to moto's CloudWatch Logs as AWS does, and ``LambdaProvider.logs`` reads it back.

Everything real: moto's server (Lambda control plane and CloudWatch Logs), the example
plugin deployed with ``dispatcher deploy``'s code and run by the AWS Lambda runtime in
Docker, the CLI in a process of its own.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
import yaml

from dispatcher import Dispatcher, Invocation, TargetUnavailable
from dispatcher.testing.lambda_kit import create_role, deploy_manifest, point_at, reset_moto
from dispatcher.testing.local_lambda import FAKE_CREDENTIALS, LocalLambda
from dispatcher.testing.local_lambda.cloudwatch import Caller, _batches, _engine_time
from providers.aws_lambda import LambdaProvider, LambdaTarget
from providers.aws_lambda.logs import log_group
from providers.base import LogsUnavailable
from tests.conftest import ROOT
from tests.lambda_support import ROLE, echo_lambda_manifest

# On the module's event loop, where its local Lambda runs; the tests without I/O are plain.
on_local_lambda = pytest.mark.asyncio(loop_scope="module")

CLI = [sys.executable, "-m", "dispatcher.cli"]
# A Lambda line as ``dispatcher logs`` prints it: which environment, then the line.
START = re.compile(r"^\[(\$LATEST|\d+)\][0-9a-f]{8} \| START RequestId: [0-9a-f-]+")
REPORT = re.compile(r"^\[(\$LATEST|\d+)\][0-9a-f]{8} \| REPORT RequestId: [0-9a-f-]+")

PRINTING_HANDLER = """
def handler(event, context):
    if "long" in event:
        print("a" * event["long"] + "END")
    else:
        print(f"printed by the handler: {event['word']}")
    return {"ok": True}
"""


def printing_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("printing.py", (1980, 1, 1, 0, 0, 0)), PRINTING_HANDLER)
    return buffer.getvalue()


class Env:
    def __init__(
        self, local: LocalLambda, dispatcher: Dispatcher, provider: LambdaProvider, data: Any
    ) -> None:
        self.local = local
        self.dispatcher = dispatcher
        self.provider = provider
        #: The manifest document, pointed at the local Lambda (for the CLI).
        self.data = data

    def target(self, function_name: str, **options: Any) -> LambdaTarget:
        return LambdaTarget(
            provider="lambda",
            function_name=function_name,
            endpoint_url=self.local.url,
            region="us-east-1",
            **options,
        )

    async def lines(self, *, lines: int = 100) -> list[str]:
        spec = self.dispatcher.manifest.plugins[0]
        return [
            line async for line in self.provider.logs(spec, spec.target, follow=False, lines=lines)
        ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(moto_server: str) -> AsyncIterator[Env]:
    await reset_moto(moto_server)
    async with LocalLambda(moto_server) as local:
        document = echo_lambda_manifest()
        manifest = await deploy_manifest(document, local.url, base_dir=ROOT)
        async with Dispatcher(manifest) as dispatcher, LambdaProvider() as provider:
            environment = Env(local, dispatcher, provider, point_at(document, local.url))
            client = await provider.client(environment.target("printing"))
            await create_role(local.url, ROLE.rpartition("/")[2])
            await client.create_function(
                FunctionName="printing",
                Runtime="python3.11",
                Role=ROLE,
                Handler="printing.handler",
                Code={"ZipFile": printing_zip()},
                Timeout=3,
            )
            yield environment


@on_local_lambda
async def test_the_functions_start_report_and_printed_lines_are_in_cloudwatch(env: Env) -> None:
    for text in ("one", "two"):
        await env.dispatcher.call("echo-lambda", "say", {"text": text})
    await env.local.flush_logs()
    lines = await env.lines()
    assert len([line for line in lines if START.match(line)]) >= 2, lines
    assert len([line for line in lines if REPORT.match(line)]) >= 2, lines
    # Behind the alias: the published version's streams.
    assert all(line.startswith("[1]") for line in lines), lines
    assert (await env.lines(lines=1)) == lines[-1:]
    assert REPORT.match(lines[-1])

    target = env.target("printing", envelope=False)
    await env.provider.invoke(target, _invocation({"word": "hello"}))
    await env.local.flush_logs()
    spec = env.dispatcher.manifest.plugins[0]
    printed = [line async for line in env.provider.logs(spec, target, follow=False, lines=10)]
    assert any(line.endswith("| printed by the handler: hello") for line in printed), printed
    assert printed[0].startswith("[$LATEST]")


@on_local_lambda
async def test_the_log_group_and_streams_are_named_as_on_aws(env: Env) -> None:
    await env.dispatcher.call("echo-lambda", "say", {"text": "named"})
    await env.local.flush_logs()
    logs = await env.provider.client(env.target("echo-plugin"), "logs")
    answer = await logs.describe_log_streams(logGroupName="/aws/lambda/echo-plugin")
    names = [stream["logStreamName"] for stream in answer["logStreams"]]
    assert names
    for name in names:
        assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/\[1\][0-9a-f]{32}", name), name


@on_local_lambda
async def test_a_function_that_never_ran_has_no_logs_yet(env: Env) -> None:
    spec = env.dispatcher.manifest.plugins[0]
    with pytest.raises(LogsUnavailable, match="has not run yet") as caught:
        async for _ in env.provider.logs(spec, env.target("never-ran"), follow=False, lines=5):
            pass
    assert "/aws/lambda/never-ran" in caught.value.message


@on_local_lambda
async def test_an_unreachable_endpoint_is_the_dispatchers_error_not_botocores(env: Env) -> None:
    spec = env.dispatcher.manifest.plugins[0]
    target = LambdaTarget(
        provider="lambda",
        function_name="echo-plugin",
        endpoint_url="http://127.0.0.1:9",
        region="us-east-1",
    )
    with pytest.raises(TargetUnavailable):
        async for _ in env.provider.logs(spec, target, follow=False, lines=5):
            pass


@on_local_lambda
async def test_long_lines_arrive_whole_and_oversized_ones_cut_at_the_event_limit(env: Env) -> None:
    # The engine keeps a line over 16 KB in parts; CloudWatch takes 256 KB an event.
    target = env.target("printing", envelope=False)
    spec = env.dispatcher.manifest.plugins[0]
    for length in (40_000, 300_000):
        await env.provider.invoke(target, _invocation({"long": length}))
    await env.local.flush_logs()
    lines = [line async for line in env.provider.logs(spec, target, follow=False, lines=100)]
    printed = [line.partition(" | ")[2] for line in lines if " | aaaa" in line]
    assert printed[-2] == "a" * 40_000 + "END"
    assert printed[-1] == "a" * (256 * 1024 - 26)


@on_local_lambda
async def test_a_cloudwatch_that_refuses_fails_no_invocation(env: Env) -> None:
    shipper = env.local._shipper
    assert shipper is not None
    url, shipper.url = shipper.url, "http://127.0.0.1:9"  # nothing listens there
    try:
        result = await env.dispatcher.call("echo-lambda", "say", {"text": "unlogged"})
        assert result["text"] == "unlogged"
        await env.local.flush_logs()  # the failure is logged, not raised
    finally:
        shipper.url = url
    await env.dispatcher.call("echo-lambda", "say", {"text": "logged"})
    await env.local.flush_logs()
    assert REPORT.match((await env.lines(lines=1))[0])


@on_local_lambda
async def test_follow_sees_a_call_made_after_it_started(env: Env) -> None:
    await env.dispatcher.call("echo-lambda", "say", {"text": "before"})
    await env.local.flush_logs()
    spec = env.dispatcher.manifest.plugins[0]
    env.provider.logs_poll_s = 0.1
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def follow() -> None:
        async for line in env.provider.logs(spec, spec.target, follow=True, lines=1):
            await seen.put(line)

    following = asyncio.create_task(follow())
    try:
        # The one line of the past comes once the first read is done: what comes after is
        # followed. (A fixed 0.5 s for that read, with lines=0, was too short on a busy
        # machine: the read came after the call below, which it then rightly counted as past.)
        async with asyncio.timeout(60):
            await seen.get()
        await asyncio.sleep(0.5)
        assert seen.empty()  # lines=1: nothing more of the past
        await env.dispatcher.call("echo-lambda", "say", {"text": "after"})
        got: list[str] = []
        async with asyncio.timeout(15):
            while not any(REPORT.match(line) for line in got):
                got.append(await seen.get())
        assert any(START.match(line) for line in got), got
        await asyncio.sleep(0.5)  # polls that look back do not show a line twice
        while not seen.empty():
            got.append(seen.get_nowait())
        assert len(got) == len(set(got)), got
    finally:
        env.provider.logs_poll_s = 1.0
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)


# -- the CLI -----------------------------------------------------------------------------


def _cli_environment() -> dict[str, str]:
    # faulthandler: a command that does not end is sent SIGABRT, and its threads' stacks
    # say where it hung.
    environment = {**os.environ, **FAKE_CREDENTIALS, "PYTHONFAULTHANDLER": "1"}
    environment.pop("AWS_ENDPOINT_URL", None)
    environment.pop("AWS_ENDPOINT_URL_LOGS", None)
    return environment


def _manifest_file(env: Env, tmp_path: Path) -> Path:
    path = tmp_path / "plugins.yaml"
    path.write_text(yaml.safe_dump(env.data), encoding="utf-8")
    return path


@on_local_lambda
async def test_cli_logs_prints_the_functions_lines(env: Env, tmp_path: Path) -> None:
    await env.dispatcher.call("echo-lambda", "say", {"text": "for the cli"})
    await env.local.flush_logs()
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "-m",
        str(_manifest_file(env, tmp_path)),
        "logs",
        "echo-lambda",
        "-n",
        "4",
        env=_cli_environment(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 4, lines
    assert REPORT.match(lines[-1]), lines


@on_local_lambda
async def test_cli_logs_follow_prints_a_later_call_until_ctrl_c(env: Env, tmp_path: Path) -> None:
    # The log group exists from the function's first call on; before it the command exits 1
    # (as it should), which run alone this case took for the command not following.
    await env.dispatcher.call("echo-lambda", "say", {"text": "before following"})
    await env.local.flush_logs()
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "-m",
        str(_manifest_file(env, tmp_path)),
        "logs",
        "echo-lambda",
        "--follow",
        "-n",
        "1",
        env=_cli_environment(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        # The one line -n 1 prints (the first call's last) says the first read is done:
        # what comes after is followed, and every line of that read counts as seen. (A fixed
        # wait for it, with -n 0, was too short on a busy machine: the command started after
        # the call, and rightly printed nothing.)
        async with asyncio.timeout(60):
            assert await process.stdout.readline(), "the CLI ended without printing a line"
        result = await env.dispatcher.call("echo-lambda", "say", {"text": "followed"})
        assert result["text"] == "followed"
        async with asyncio.timeout(60):
            line = (await process.stdout.readline()).decode()
            while not REPORT.match(line):
                assert line, "the CLI ended without printing the call"
                line = (await process.stdout.readline()).decode()
        process.send_signal(signal.SIGINT)
        # Both pipes read while waiting: a command blocked writing to a full pipe would
        # never exit, and what it wrote says why it did not.
        try:
            async with asyncio.timeout(30):
                _, errors = await process.communicate()
        except TimeoutError:
            process.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            async with asyncio.timeout(10):
                stacks = await process.stderr.read() if process.stderr else b""
            pytest.fail(f"Ctrl-C did not end the command within 30 s: {stacks.decode()}")
        assert process.returncode == 0, errors.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# -- the pieces, without I/O --------------------------------------------------------------


def test_the_log_group_is_named_after_the_function_however_the_target_names_it() -> None:
    for name in (
        "echo",
        "echo:live",
        "123456789012:function:echo",
        "arn:aws:lambda:us-east-1:123456789012:function:echo",
        "arn:aws:lambda:us-east-1:123456789012:function:echo:7",
    ):
        assert log_group(name) == "/aws/lambda/echo", name


def test_the_engines_times_become_since_and_milliseconds() -> None:
    assert _engine_time("2026-12-01T20:05:33.123456789Z") == ("1796155533.123456789", 1796155533123)
    # RFC 3339 with nanoseconds drops trailing zeros, and the fraction when it is zero.
    assert _engine_time("2026-12-01T20:05:33.5Z") == ("1796155533.500000000", 1796155533500)
    assert _engine_time("2026-12-01T20:05:33Z") == ("1796155533.000000000", 1796155533000)
    assert _engine_time("not a time") is None
    assert _engine_time("2026-12-01T20:05:33.12ab") is None


def test_a_caller_comes_from_the_signature_or_the_defaults() -> None:
    signed = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/eu-west-1/lambda/aws4_request, X"
    assert Caller.of({"Authorization": signed}) == Caller("AKIDEXAMPLE", "eu-west-1")
    assert Caller.of({}) == Caller("testing", "us-east-1")
    assert Caller.of({"Authorization": "Credential=//"}) == Caller("testing", "us-east-1")
    headers = Caller("key", "eu-west-1").headers("PutLogEvents")
    assert "/eu-west-1/logs/aws4_request" in headers["Authorization"]


def test_oversized_output_is_cut_and_batched_within_putlogevents_limits() -> None:
    huge = "é" * 200_000  # 400 KB of UTF-8 in one line
    events = [(1, huge), (2, ""), *((3, "x" * 1000) for _ in range(12_000))]
    batches = _batches(events)
    assert sum(len(batch) for batch in batches) == len(events)
    for batch in batches:
        assert len(batch) <= 10_000
        assert sum(len(message.encode()) + 26 for _, message in batch) <= 1_048_576
        assert all(0 < len(message.encode()) <= 256 * 1024 - 26 for _, message in batch)
    assert batches[0][0][1].startswith("é")
    assert orjson.dumps(batches[0][0][1])  # still valid UTF-8


def _invocation(params: Any) -> Invocation:
    return Invocation(
        plugin="printing",
        version="1.0.0",
        method="handler",
        params=params,
        deadline=asyncio.get_running_loop().time() + 10,
        request_id="req-logs",
    )
