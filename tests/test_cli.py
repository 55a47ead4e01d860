"""The `dispatcher` CLI and the demo, run as a user runs them: real processes, real servers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def served_port() -> Iterator[int]:
    """The example plugin served by `dispatcher-plugin serve`, as the demo manifest expects."""
    port = free_port()
    server = subprocess.Popen(
        [
            str(BIN / "dispatcher-plugin"),
            "serve",
            "echo_plugin:EchoPlugin",
            "--path",
            str(ROOT / "examples" / "python"),
            "--port",
            str(port),
        ]
    )
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            pytest.fail("dispatcher-plugin serve did not come up")
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)


def cli(*args: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ECHO_HTTP_PORT": str(port or 9)}
    return subprocess.run(
        [str(BIN / "dispatcher"), "-m", str(ROOT / "plugins.yaml"), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )


def test_validate_and_list() -> None:
    validated = cli("validate")
    assert validated.returncode == 0, validated.stderr
    assert "ok (2 plugins, 8 methods)" in validated.stdout
    listed = cli("list")
    assert "echo@1.0.0" in listed.stdout
    assert "http http://127.0.0.1:9/invoke" in listed.stdout


def test_call_prints_json_and_fails_with_the_typed_error(served_port: int) -> None:
    answered = cli(
        "call", "echo-http.say", "--params", '{"text": "hi"}', "--caller", "cli", port=served_port
    )
    assert answered.returncode == 0, answered.stderr
    assert json.loads(answered.stdout) == {"text": "hi", "greeting": "hello", "caller": "cli"}
    failed = cli("call", "echo-http.withdraw", "-p", '{"amount": 500}', port=served_port)
    assert failed.returncode == 1
    assert json.loads(failed.stderr)["error"]["type"] == "InsufficientFunds"
    bad_json = cli("call", "echo.say", "-p", "{oops")
    assert bad_json.returncode == 2
    assert "Traceback" not in bad_json.stderr


def test_health_reports_every_target(served_port: int) -> None:
    healthy = cli("health", port=served_port)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    rows = healthy.stdout.splitlines()[1:]
    assert len(rows) == 2
    assert all(" serving " in row and "not_serving" not in row for row in rows)
    down = cli("health", port=free_port())
    assert down.returncode == 1
    assert "not_serving" in down.stdout


def test_the_demo_runs_end_to_end() -> None:
    demo = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert demo.returncode == 0, demo.stderr
    assert "InsufficientFunds" in demo.stdout
    assert "DeadlineExceeded" in demo.stdout
    assert demo.stdout.count("→ serving") == 2
