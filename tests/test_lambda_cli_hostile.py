"""``dispatcher deploy``, ``remove`` and ``logs`` against hostile surroundings: secrets that
must not reach the logs, endpoints mistyped, plugin folders that cannot be read, servers
that lie or never answer. moto's server stands in for AWS, small aiohttp servers on
127.0.0.1 for the endpoints that lie; the CLI runs in a process of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from dispatcher.testing.lambda_kit import create_role, point_at
from dispatcher.testing.local_lambda import FAKE_CREDENTIALS
from providers.aws_lambda.client import CONTROL_PLANE_READ_TIMEOUT
from tests.lambda_support import ROLE, echo_lambda_manifest

CLI = [sys.executable, "-m", "dispatcher.cli"]
SESSION_TOKEN = "sessiontokenSECRET0123456789"
ACCESS_KEY = "AKIASECRETKEY0123456"
DB_PASSWORD = "hunter2pw"


def write_manifest(tmp_path: Path, document: dict[str, Any]) -> Path:
    manifest = tmp_path / "plugins.yaml"
    manifest.write_text(yaml.safe_dump(document))
    return manifest


def run(
    manifest: Path, *arguments: str, timeout: float = 60, **environment: str
) -> subprocess.CompletedProcess[str]:
    """The CLI on ``manifest``, with fake AWS credentials and ``environment`` added."""
    return subprocess.run(
        [*CLI, "-m", str(manifest), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **FAKE_CREDENTIALS, **environment},
    )


# -- 1. -vv must not print credentials or the function's environment -------------------------


def test_debug_logging_of_a_deploy_prints_no_secret(moto_server: str, tmp_path: Path) -> None:
    document = point_at(echo_lambda_manifest("secret-env"), moto_server)
    document["plugins"][0]["target"]["deploy"]["environment"] = {"DB_PASSWORD": DB_PASSWORD}
    manifest = write_manifest(tmp_path, document)
    asyncio.run(create_role(moto_server, ROLE.rpartition("/")[2]))
    credentials = {"AWS_SESSION_TOKEN": SESSION_TOKEN, "AWS_ACCESS_KEY_ID": ACCESS_KEY}
    for arguments in (("deploy", "-vv"), ("deploy", "--dry-run", "-vv"), ("remove", "-vv")):
        result = run(manifest, *arguments, "echo-lambda", **credentials)
        for secret in (SESSION_TOKEN, ACCESS_KEY, DB_PASSWORD):
            assert secret not in result.stderr + result.stdout, (arguments, secret)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "DEBUG" in result.stderr  # -vv still logs the dispatcher's own debug lines


# -- 2. an endpoint variable without a scheme --------------------------------------------------


LOGS_ONLY = [("logs", "echo-lambda")]
EVERY_COMMAND = [*LOGS_ONLY, ("deploy", "--dry-run", "echo-lambda"), ("remove", "echo-lambda")]


@pytest.mark.parametrize(
    ("variable", "value", "commands"),
    [
        ("AWS_ENDPOINT_URL_CLOUDWATCH_LOGS", "127.0.0.1:5055", LOGS_ONLY),
        ("AWS_ENDPOINT_URL", "http://[::1", EVERY_COMMAND),
        ("AWS_ENDPOINT_URL", "127.0.0.1:5055", EVERY_COMMAND),
    ],
)
def test_an_endpoint_variable_without_a_scheme_is_one_line(
    tmp_path: Path, variable: str, value: str, commands: list[tuple[str, ...]]
) -> None:
    manifest = write_manifest(tmp_path, echo_lambda_manifest("no-scheme", region="us-east-1"))
    for arguments in commands:
        result = run(manifest, *arguments, **{variable: value})
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert "ValueError" not in result.stderr
        assert "http:// or https://" in result.stderr, result.stderr
        assert f"set {variable} to a well-formed URL" in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr


# -- 3. a plugin folder that cannot be read; a module that is no file --------------------------

#: Where nothing listens: packaging fails before any request is made.
NOWHERE = "http://127.0.0.1:9"
PACKAGE_COMMANDS = [("deploy",), ("deploy", "--dry-run"), ("deploy", "--package-only", "--out")]


def plugin_manifest(tmp_path: Path, folder: Path | None, entrypoint: str) -> Path:
    document = point_at(echo_lambda_manifest("hostile", path=str(folder)), NOWHERE)
    deploy = document["plugins"][0]["target"]["deploy"]
    deploy["entrypoint"] = entrypoint
    if folder is None:
        del deploy["path"]
    return write_manifest(tmp_path, document)


def package_everywhere(manifest: Path, tmp_path: Path) -> list[str]:
    """The error line of deploy, deploy --dry-run and --package-only, each exit 1."""
    errors = []
    for arguments in PACKAGE_COMMANDS:
        extra = (str(tmp_path / "out"),) if arguments[-1] == "--out" else ()
        result = run(manifest, *arguments, *extra, "echo-lambda")
        assert result.returncode == 1, (arguments, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        assert "cannot write" not in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        errors.append(result.stderr)
    return errors


def unreadable_folder(tmp_path: Path) -> tuple[Path, str]:
    """A plugin folder holding a file its user cannot read, and that file's name. As root
    every mode bit reads, so a kernel file that only takes writes stands in for it."""
    if os.geteuid() == 0:
        return Path("/sys/bus/container"), "drivers_probe"
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "secret.py").write_text("x = 1\n")
    (folder / "secret.py").chmod(0)
    return folder, "secret.py"


def test_an_unreadable_file_in_the_plugin_folder_is_a_read_error(tmp_path: Path) -> None:
    folder, name = unreadable_folder(tmp_path)
    manifest = plugin_manifest(tmp_path, folder, "echo_plugin:EchoPlugin")
    for error in package_everywhere(manifest, tmp_path):
        assert f"cannot read {folder}/" in error and name in error, error


@pytest.mark.parametrize("module", ["sys", "__main__"])
def test_a_module_that_is_no_file_is_named(tmp_path: Path, module: str) -> None:
    manifest = plugin_manifest(tmp_path, None, f"{module}:X")
    for error in package_everywhere(manifest, tmp_path):
        assert f"plugin module {module!r}" in error, error


def test_a_loop_of_links_in_the_plugin_folder_is_a_read_error(tmp_path: Path) -> None:
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "plugin.py").write_text("x = 1\n")
    (folder / "a").symlink_to("b")
    (folder / "b").symlink_to("a")
    manifest = plugin_manifest(tmp_path, folder, "plugin:X")
    for error in package_everywhere(manifest, tmp_path):
        assert "in the plugin folder" in error and "Symlink loop" in error, error


# -- 4. .dispatcherignore in another encoding -------------------------------------------------


def zip_names(out: Path) -> list[str]:
    import zipfile

    with zipfile.ZipFile(out / "hostile.zip") as archive:
        return archive.namelist()


def test_a_byte_order_mark_does_not_unignore_the_first_pattern(tmp_path: Path) -> None:
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "plugin.py").write_text("x = 1\n")
    (folder / "notes.secret").write_text("do not ship\n")
    (folder / ".dispatcherignore").write_bytes("*.secret\n".encode("utf-8-sig"))
    manifest = plugin_manifest(tmp_path, folder, "plugin:X")
    result = run(manifest, "deploy", "--package-only", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    names = zip_names(tmp_path / "out")
    assert "plugin.py" in names and "notes.secret" not in names, names


def test_an_ignore_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "plugin.py").write_text("x = 1\n")
    (folder / ".dispatcherignore").write_bytes("*.secret\n".encode("utf-16"))
    manifest = plugin_manifest(tmp_path, folder, "plugin:X")
    for error in package_everywhere(manifest, tmp_path):
        assert f"{folder}/.dispatcherignore is not UTF-8 text" in error, error


# -- 5. text from the server is escaped ------------------------------------------------------

#: Retitles the terminal when printed raw.
EVIL = "\x1b]0;PWNED\x07"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LyingServer:
    """An aiohttp server on 127.0.0.1 answering every request with ``handler``, on a loop
    of its own in a thread, so the CLI's process can be run and waited for meanwhile."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.url = ""

    def __enter__(self) -> LyingServer:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _stop(self) -> None:
        await self._runner.cleanup()
        # Handlers still waiting (a silent server's) end here, not as "destroyed" tasks.
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handler)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"


async def refuse_everything(request: web.Request) -> web.Response:
    """An AWS error (REST and JSON protocols alike) whose message drives a terminal."""
    body = {"__type": "InvalidParameterValueException", "message": f"bad {EVIL} value"}
    headers = {"x-amzn-ErrorType": "InvalidParameterValueException"}
    return web.json_response(body, status=400, headers=headers)


async def lie_about_the_function(request: web.Request) -> web.Response:
    """A deployed function whose hash and alias's version carry control characters."""
    path = request.path
    if path.endswith("/configuration"):
        return web.json_response({"FunctionName": "hostile", "CodeSha256": EVIL * 3})
    if path.endswith("/versions"):
        return web.json_response({"Versions": []})
    if "/aliases/" in path:
        return web.json_response({"Name": "live", "FunctionVersion": EVIL})
    return await refuse_everything(request)


@pytest.fixture
def refusing_server() -> Iterator[str]:
    with LyingServer(refuse_everything) as server:
        yield server.url


def assert_escaped(result: subprocess.CompletedProcess[str]) -> None:
    for text in (result.stdout, result.stderr):
        assert "\x1b" not in text and "\x07" not in text, text
    assert "\\x1b]0;PWNED\\x07" in result.stdout + result.stderr, (result.stdout, result.stderr)


def test_server_error_messages_are_escaped(refusing_server: str, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, point_at(echo_lambda_manifest(), refusing_server))
    for arguments in [("deploy",), ("deploy", "--dry-run"), ("remove",), ("logs",)]:
        result = run(manifest, *arguments, "echo-lambda")
        assert result.returncode == 1, result.stderr
        assert_escaped(result)
        assert result.stderr.count("lambda echo-plugin:live (us-east-1)") <= 1, result.stderr


def test_a_dry_runs_steps_quoting_the_server_are_escaped(tmp_path: Path) -> None:
    with LyingServer(lie_about_the_function) as server:
        manifest = write_manifest(tmp_path, point_at(echo_lambda_manifest("hostile"), server.url))
        result = run(manifest, "deploy", "--dry-run", "echo-lambda")
    assert result.returncode == 0, result.stderr
    assert_escaped(result)
    assert "  update code hostile (sha256 \\x1b]0;PWNED\\x07" in result.stdout, result.stdout


def test_unknown_plugin_names_are_escaped(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, echo_lambda_manifest())
    for command in ("deploy", "remove"):
        result = run(manifest, command, f"nope{EVIL}")
        assert result.returncode == 2, result.stderr
        assert "\x1b" not in result.stderr, result.stderr
        assert "not in the manifest: 'nope\\x1b]0;PWNED\\x07'" in result.stderr, result.stderr


# -- 6. logs: -n bounded, Ctrl-C is exit 130 -----------------------------------------------------


def test_a_huge_line_count_is_a_usage_error(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, echo_lambda_manifest())
    result = run(manifest, "logs", "-n", "99999999999999999999", "echo-lambda")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "OverflowError" not in result.stderr
    assert "Invalid value for '-n' / '--lines'" in result.stderr, result.stderr


async def never_answer(request: web.Request) -> web.Response:
    await asyncio.sleep(3600)
    raise AssertionError("not reached")


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts every connection and request, and never answers."""
    with LyingServer(never_answer) as server:
        yield server.url


def start(manifest: Path, *arguments: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "-m", str(manifest), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **FAKE_CREDENTIALS},
    )


def test_ctrl_c_during_logs_exits_130(silent_server: str, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, point_at(echo_lambda_manifest(), silent_server))
    process = start(manifest, "logs", "echo-lambda")
    try:
        process.wait(3)  # connected and waiting by then
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr


# -- 7. a server that never answers ----------------------------------------------------------


def test_a_silent_server_ends_each_command_with_one_line(
    silent_server: str, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, point_at(echo_lambda_manifest(), silent_server))
    commands = [("deploy",), ("deploy", "--dry-run"), ("remove",), ("logs",)]
    # Side by side: each waits out the same read timeout.
    processes = [start(manifest, *arguments, "echo-lambda") for arguments in commands]
    for arguments, process in zip(commands, processes, strict=True):
        _, stderr = process.communicate(timeout=CONTROL_PLANE_READ_TIMEOUT + 30)
        assert process.returncode == 1, (arguments, stderr)
        assert len(stderr.splitlines()) == 1, (arguments, stderr)
        assert "timed out" in stderr, (arguments, stderr)


# -- 8. logs -n reads backwards from now -------------------------------------------------------


class BusyLogGroup:
    """CloudWatch Logs' FilterLogEvents over a group with endless old events (every page
    has a next one) and five from the last minute."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def answer(self, request: web.Request) -> web.Response:
        asked = json.loads(await request.read())
        self.requests.append(asked)
        now_ms = int(time.time() * 1000)
        if asked.get("startTime", 0) >= now_ms - 10 * 60_000:
            events = [self._event(f"recent {index}", now_ms - 50_000 + index) for index in range(5)]
            return web.json_response({"events": events})
        old = [self._event("old", 1_000 + index) for index in range(100)]
        return web.json_response({"events": old, "nextToken": f"page{len(self.requests)}"})

    @staticmethod
    def _event(message: str, timestamp: int) -> dict[str, Any]:
        return {
            "eventId": f"{message}-{timestamp}",
            "timestamp": timestamp,
            "message": message,
            "logStreamName": "2026/12/07/[1]0123456789abcdef",
        }


def test_logs_reads_the_last_lines_without_reading_the_whole_group(tmp_path: Path) -> None:
    group = BusyLogGroup()
    with LyingServer(group.answer) as server:
        manifest = write_manifest(tmp_path, point_at(echo_lambda_manifest(), server.url))
        result = run(manifest, "logs", "-n", "3", "echo-lambda", timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "[1]01234567 | recent 2",
        "[1]01234567 | recent 3",
        "[1]01234567 | recent 4",
    ]
    assert len(group.requests) == 1, group.requests


# -- 9. messages that say what failed --------------------------------------------------------


async def deny_everything(request: web.Request) -> web.Response:
    body = {"__type": "AccessDeniedException", "message": "User is not authorized"}
    headers = {"x-amzn-ErrorType": "AccessDeniedException"}
    return web.json_response(body, status=403, headers=headers)


def test_access_denied_names_the_denied_call(tmp_path: Path) -> None:
    with LyingServer(deny_everything) as server:
        manifest = write_manifest(tmp_path, point_at(echo_lambda_manifest(), server.url))
        deployed = run(manifest, "deploy", "--dry-run", "echo-lambda")
        logged = run(manifest, "logs", "echo-lambda")
    assert "not allowed to call GetFunctionConfiguration for" in deployed.stderr, deployed.stderr
    assert "not allowed to call FilterLogEvents for" in logged.stderr, logged.stderr
    assert "invoke" not in deployed.stderr + logged.stderr


def test_an_unreachable_cloudwatch_logs_is_named(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, echo_lambda_manifest(region="us-east-1"))
    result = run(manifest, "logs", "echo-lambda", AWS_ENDPOINT_URL_CLOUDWATCH_LOGS=NOWHERE)
    assert result.returncode == 1, result.stderr
    expected = "cannot reach CloudWatch Logs for lambda echo-plugin:live (us-east-1) (endpoint"
    assert f"{expected} from AWS_ENDPOINT_URL_CLOUDWATCH_LOGS)" in result.stderr, result.stderr


def test_a_failed_follow_prints_its_error_once(refusing_server: str, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, point_at(echo_lambda_manifest(), refusing_server))
    result = run(manifest, "logs", "-f", "echo-lambda")
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
