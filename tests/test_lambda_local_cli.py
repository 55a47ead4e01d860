"""``dispatcher local-lambda``, used from a shell the way its output says: started as a
process, ``dispatcher deploy`` and ``dispatcher call`` pointed at it, stopped by SIGTERM,
no container left behind. Everything real: moto, the runtime image, Docker."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
import yaml

from dispatcher.testing.local_lambda import FAKE_CREDENTIALS, DockerEngine
from tests.lambda_support import echo_lambda_manifest

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

CLI = [sys.executable, "-m", "dispatcher.cli"]
ENVIRONMENT = {**os.environ, **FAKE_CREDENTIALS}
# Whatever endpoint the developer's shell has set must not decide where these go.
ENVIRONMENT.pop("AWS_ENDPOINT_URL", None)
ENVIRONMENT.pop("AWS_ENDPOINT_URL_LAMBDA", None)
ENVIRONMENT.pop("AWS_ENDPOINT_URL_CLOUDWATCH_LOGS", None)


class Running:
    """The ``local-lambda`` process, its endpoint and what it printed."""

    def __init__(self, process: asyncio.subprocess.Process, url: str, banner: str) -> None:
        self.process = process
        self.url = url
        self.banner = banner


async def start(*arguments: str, cwd: Path) -> Running:
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "local-lambda",
        "--port",
        "0",
        *arguments,
        cwd=cwd,
        env=ENVIRONMENT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    banner = ""
    async with asyncio.timeout(60):
        while "Ctrl-C stops it" not in banner:
            line = await process.stdout.readline()
            if not line:
                assert process.stderr is not None
                raise AssertionError(
                    f"local-lambda exited: {(await process.stderr.read()).decode()}"
                )
            banner += line.decode()
    found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", banner)
    assert found, banner
    return Running(process, found.group(1), banner)


async def stop(running: Running) -> tuple[int, str]:
    process = running.process
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(60):
        _, errors = await process.communicate()
    assert process.returncode is not None
    return process.returncode, errors.decode()


async def containers_of(pid: int) -> list[Any]:
    docker = DockerEngine()
    await docker.start()
    try:
        filters = orjson.dumps({"label": [f"linchkit.owner-pid={pid}"]}).decode()
        status, answer = await docker.request(
            "GET", "/containers/json", params={"all": "1", "filters": filters}
        )
        assert status == 200
        return list(orjson.loads(answer))
    finally:
        await docker.aclose()


def dispatcher(*arguments: str, cwd: Path, **environment: str) -> str:
    ran = subprocess.run(
        [*CLI, *arguments],
        cwd=cwd,
        env={**ENVIRONMENT, **environment},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return ran.stdout


@pytest_asyncio.fixture(loop_scope="module")
async def local_lambda_process(tmp_path: Path) -> AsyncIterator[Running]:
    running = await start("--role", "linchkit-plugin", cwd=tmp_path)
    try:
        yield running
    finally:
        await stop(running)


async def test_deploy_and_call_through_the_running_command(
    local_lambda_process: Running, tmp_path: Path
) -> None:
    running = local_lambda_process
    assert f"endpoint_url: {running.url}" in running.banner
    assert f"export AWS_ENDPOINT_URL_LAMBDA={running.url}" in running.banner
    assert f"AWS_ENDPOINT_URL_CLOUDWATCH_LOGS={running.url}" in running.banner
    assert "AWS_ACCESS_KEY_ID=testing" in running.banner
    assert "arn:aws:iam::123456789012:role/linchkit-plugin" in running.banner
    # The manifest way: endpoint_url in the target.
    pointed = tmp_path / "plugins.yaml"
    pointed.write_text(
        yaml.safe_dump(
            echo_lambda_manifest(
                "cli-echo",
                greeting="from local-lambda",
                endpoint_url=running.url,
                region="us-east-1",
            )
        )
    )
    deployed = dispatcher("deploy", cwd=tmp_path)
    assert "echo-lambda@1.0.0: deployed lambda cli-echo:live (us-east-1)" in deployed
    called = dispatcher("call", "echo-lambda.say", "-p", '{"text": "hi"}', cwd=tmp_path)
    assert orjson.loads(called) == {"text": "hi", "greeting": "from local-lambda", "caller": None}
    # The environment way: the manifest unchanged, as it would be for AWS.
    plain = tmp_path / "aws.yaml"
    plain.write_text(yaml.safe_dump(echo_lambda_manifest("cli-echo")))
    again = dispatcher(
        "-m", str(plain), "call", "echo-lambda.say", "-p", '{"text": "env"}',
        cwd=tmp_path, AWS_ENDPOINT_URL_LAMBDA=running.url,
    )  # fmt: skip
    assert orjson.loads(again)["greeting"] == "from local-lambda"
    # What the calls printed, in the local Lambda's CloudWatch Logs, both ways. Shipped just
    # after each answer: well before a new dispatcher process has started.
    endpoints = {"AWS_ENDPOINT_URL_LAMBDA": running.url}
    endpoints["AWS_ENDPOINT_URL_CLOUDWATCH_LOGS"] = running.url
    for arguments, environment in (([], {}), (["-m", str(plain)], endpoints)):
        printed = dispatcher(*arguments, "logs", "echo-lambda", cwd=tmp_path, **environment)
        lines = printed.splitlines()
        assert len([line for line in lines if "| START RequestId:" in line]) == 2, printed
        assert "| REPORT RequestId:" in lines[-1], printed
    # A container ran the function; SIGTERM ends the command and removes it.
    pid = running.process.pid
    assert await containers_of(pid)
    code, errors = await stop(running)
    assert code == 0, errors
    assert "stopped" in errors
    assert await containers_of(pid) == []


async def test_the_manifest_roles_are_created_and_a_taken_port_is_refused(
    local_lambda_process: Running, tmp_path: Path
) -> None:
    running_port = local_lambda_process.url.rpartition(":")[2]
    document = echo_lambda_manifest("roles")
    document["plugins"][0]["target"]["deploy"]["role"] = (
        "arn:aws:iam::123456789012:role/from-manifest"
    )
    (tmp_path / "plugins.yaml").write_text(yaml.safe_dump(document))
    process = await asyncio.create_subprocess_exec(
        *CLI, "local-lambda", "--port", running_port,
        cwd=tmp_path, env=ENVIRONMENT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        _, errors = await process.communicate()
    assert process.returncode == 1
    assert f"cannot listen on 127.0.0.1:{running_port}" in errors.decode()
    assert "Traceback" not in errors.decode()
    # On a free port, the manifest's role is made.
    second = await start(cwd=tmp_path)
    try:
        assert "arn:aws:iam::123456789012:role/from-manifest" in second.banner
    finally:
        code, _ = await stop(second)
    assert code == 0
    assert await containers_of(second.process.pid) == []
