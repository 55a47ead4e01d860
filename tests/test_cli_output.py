"""Where a command's output goes cannot take it: a full disk, a closed standard output, a
reader that went away. The command says so in one line and exits 1 (a result is never
lost with exit 0), or, for a reader that left, quietly; never a traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import LOCAL_TARGET, ROOT, echo_plugin

pytestmark = pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    path = tmp_path / "plugins.yaml"
    path.write_text(json.dumps({"version": 1, "plugins": [echo_plugin("echo", LOCAL_TARGET)]}))
    return path


def dispatcher(
    plugins: Path, *args: str, to: str | None = None, closed: bool = False
) -> subprocess.CompletedProcess[str]:
    """The CLI with its standard output on the file ``to``, or closed (``>&-``)."""
    with open(to or os.devnull, "w") as stdout:
        return subprocess.run(
            [sys.executable, "-m", "dispatcher.cli", "-m", str(plugins), *args],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
            preexec_fn=(lambda: os.close(1)) if closed else None,
        )


CALL = ("call", "echo.say", "-p", '{"text": "hi"}')


@pytest.mark.parametrize(
    "args", [CALL, ("schema",), ("list",), ("validate",), ("--version",)], ids=" ".join
)
def test_a_full_disk_is_said_in_one_line_exit_1(plugins: Path, args: tuple[str, ...]) -> None:
    # Each was a traceback ending in OSError: [Errno 28].
    run = dispatcher(plugins, *args, to="/dev/full")
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr
    assert run.stderr.strip().endswith("error: cannot write the output: No space left on device"), (
        run.stderr
    )


@pytest.mark.parametrize("args", [CALL, ("list",)], ids=" ".join)
def test_a_closed_standard_output_fails_the_command_instead_of_losing_its_result(
    plugins: Path, args: tuple[str, ...]
) -> None:
    # The call was made and its result dropped, exit 0.
    run = dispatcher(plugins, *args, closed=True)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr
    assert "error: cannot write the output: standard output is closed" in run.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly(plugins: Path) -> None:
    command = [sys.executable, "-m", "dispatcher.cli", "-m", str(plugins), "schema"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT) as run:
        assert run.stdout is not None and run.stderr is not None
        run.stdout.read(10)
        run.stdout.close()
        errors = run.stderr.read().decode()
        run.wait(60)
    assert "Traceback" not in errors and "Exception ignored" not in errors, errors


def test_a_command_with_room_for_its_output_writes_it(plugins: Path, tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    run = dispatcher(plugins, *CALL, to=str(result))
    assert run.returncode == 0, run.stderr
    assert "hi" in json.loads(result.read_text())["text"]


def test_a_gateway_whose_standard_output_is_closed_serves_on(plugins: Path) -> None:
    # Its "listening on" lines are for whoever reads them: with nobody there, it serves
    # and says so in its log, rather than failing to start.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "dispatcher.cli", "-m", str(plugins), "serve"]
    with subprocess.Popen(
        [*command, "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=lambda: os.close(1),
    ) as gateway:
        try:
            assert _answers(f"http://127.0.0.1:{port}/healthz", within=60), "never served"
        finally:
            gateway.send_signal(signal.SIGTERM)
            _, errors = gateway.communicate(timeout=60)
    assert "cannot write 'listening on" in errors, errors
    assert "Traceback" not in errors, errors


def _answers(url: str, *, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            time.sleep(0.1)
    return False


def test_ctrl_c_ends_a_call_as_a_shell_expects(plugins: Path) -> None:
    # It was click's "Aborted!" and exit 1, a failed call's code.
    command = [sys.executable, "-m", "dispatcher.cli", "-m", str(plugins), "call", "echo.sleep"]
    with subprocess.Popen(
        [*command, "-p", '{"seconds": 60}', "--timeout", "120", "-vv"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as call:
        assert call.stderr is not None
        # -vv: asyncio's first line says the loop runs, the call about to start.
        first = call.stderr.readline()
        assert "Using selector" in first, first
        time.sleep(0.5)
        call.send_signal(signal.SIGINT)
        stdout, stderr = call.communicate(timeout=60)
    assert call.returncode == 130, stderr
    assert stderr.strip().endswith("interrupted") and "Traceback" not in stderr, stderr
    assert stdout == ""
