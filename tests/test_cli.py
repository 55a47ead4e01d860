"""The `dispatcher` CLI and the demo, run as a user runs them: real processes, real servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
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
    # The table cuts a long detail at a word, marked; the whole of it follows the table.
    row = next(line for line in down.stdout.splitlines() if "not_serving" in line)
    assert row.endswith("…")
    whole = [line for line in down.stdout.splitlines() if ": NOT_SERVING: " in line]
    assert len(whole) == 1 and len(whole[0].split(": NOT_SERVING: ", 1)[1]) > 60


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


# -- conventions users bring from other CLIs ---------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dispatcher"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
        timeout=60,
    )


def write_manifest(folder: Path, *plugins: dict[str, object]) -> Path:
    path = folder / "other.yaml"
    path.write_text(json.dumps({"version": 1, "plugins": list(plugins)}))
    return path


ECHO_LOCAL = {
    "id": "echo",
    "version": "1.0.0",
    "target": {
        "provider": "local",
        "entrypoint": "echo_plugin:EchoPlugin",
        "path": str(ROOT / "examples" / "python"),
    },
    "methods": {"say": {}},
}


def test_the_manifest_option_goes_before_or_after_the_command_or_in_the_environment(
    tmp_path: Path,
) -> None:
    manifest = str(write_manifest(tmp_path, ECHO_LOCAL))
    for args, env in [
        (["-m", manifest, "validate"], None),
        (["validate", "-m", manifest], None),
        (["validate"], {"DISPATCHER_MANIFEST": manifest}),
        (["-m", "absent.yaml", "validate", "--manifest", manifest], None),
    ]:
        answered = run_cli(*args, env=env)
        assert answered.returncode == 0, (args, answered.stderr)
        assert "ok (1 plugins, 1 methods)" in answered.stdout
    called = run_cli("call", "echo.say", "-p", '{"text": "hi"}', "-m", manifest)
    assert json.loads(called.stdout)["text"] == "hi", called.stderr
    assert "DISPATCHER_MANIFEST" in run_cli("--help").stdout


def test_list_and_health_print_json_for_scripts(tmp_path: Path) -> None:
    manifest = str(write_manifest(tmp_path, ECHO_LOCAL))
    listed = json.loads(run_cli("-m", manifest, "list", "-o", "json").stdout)
    assert listed == [
        {
            "plugin": "echo",
            "version": "1.0.0",
            "method": "say",
            "timeout_ms": 30000,
            "target": "local echo_plugin:EchoPlugin",
        }
    ]
    health = run_cli("-m", manifest, "health", "--output", "json")
    assert health.returncode == 0, health.stderr
    (report,) = json.loads(health.stdout)
    assert (report["plugin"], report["status"]) == ("echo", "serving")


def test_version() -> None:
    answered = run_cli("--version")
    assert answered.returncode == 0
    assert answered.stdout.startswith("dispatcher, version ")


def test_a_call_is_not_held_up_by_another_plugin_that_is_down(tmp_path: Path) -> None:
    down = {
        "id": "down",
        "version": "1.0.0",
        "target": {
            "provider": "grpc",
            "address": f"127.0.0.1:{free_port()}",  # nothing listens
            "lifecycle": "dispatcher",
            "connect_timeout_ms": 5000,
        },
        "methods": {"anything": {}},
    }
    manifest = str(write_manifest(tmp_path, ECHO_LOCAL, down))
    started = time.monotonic()
    called = run_cli("-m", manifest, "call", "echo.say", "-p", '{"text": "hi"}')
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["text"] == "hi"
    assert time.monotonic() - started < 4.5  # the down plugin's 5 s connect is not waited for


CRASHING = {
    "id": "crashing",
    "version": "1.0.0",
    "target": {
        "provider": "subprocess",
        "command": [sys.executable, str(ROOT / "tests" / "plugins" / "crashing_plugin.py")],
        "env": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    },
    "methods": {"pid": {}},
}


def test_verbose_shows_what_plugins_print(tmp_path: Path) -> None:
    manifest = str(write_manifest(tmp_path, CRASHING))
    quiet = run_cli("-m", manifest, "call", "crashing.pid")
    loud = run_cli("-v", "-m", manifest, "call", "crashing.pid")
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert "started" not in quiet.stderr
    assert "crashing plugin" in loud.stderr
    assert "started" in loud.stderr


@pytest.mark.parametrize(
    ("args", "info", "debug"),
    [
        (["call", "crashing.pid"], False, False),
        (["call", "crashing.pid", "-v"], True, False),
        (["call", "crashing.pid", "-vv"], True, True),
        (["-v", "call", "crashing.pid", "-v"], True, True),  # counted wherever given
        (["-vv", "call", "crashing.pid"], True, True),  # as it always was
        (["-v", "-v", "call", "crashing.pid"], True, True),
        (["-vv", "call", "crashing.pid", "--log-level", "warning"], False, False),
        (["call", "crashing.pid", "--log-level", "info"], True, False),
    ],
)
def test_verbose_and_log_level_go_before_or_after_the_command(
    tmp_path: Path, args: list[str], info: bool, debug: bool
) -> None:
    """Operators type the flag after the command (``dispatcher serve -v``); it means what
    it means before it. INFO shows the plugin's stderr, DEBUG asyncio's first line."""
    manifest = str(write_manifest(tmp_path, CRASHING))
    ran = run_cli("-m", manifest, *args)
    assert ran.returncode == 0, ran.stderr
    assert ("crashing plugin" in ran.stderr) is info, ran.stderr
    assert ("DEBUG asyncio: Using selector" in ran.stderr) is debug, ran.stderr


def test_serve_takes_verbose_after_its_name(tmp_path: Path) -> None:
    manifest = str(write_manifest(tmp_path, ECHO_LOCAL))
    with subprocess.Popen(
        [str(BIN / "dispatcher"), "-m", manifest, "serve", "--port", "0", "-v"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as server:
        try:
            assert server.stdout is not None
            listening = server.stdout.readline()  # empty: it ended (a refused option)
            if listening.startswith("listening on http://127.0.0.1:"):
                server.send_signal(signal.SIGINT)
            _, stderr = server.communicate(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
    assert server.returncode == 0, stderr
    assert "INFO dispatcher: draining" in stderr


def test_every_command_and_group_takes_verbose_and_log_level_once() -> None:
    """Given by the group's classes, not declared by each command: one a module adds
    later takes them too, and none may take -v for something else."""
    from dispatcher.cli import main

    context = click.Context(main)

    def walk(group: click.Group, path: str) -> Iterator[tuple[str, click.Command]]:
        for name in group.list_commands(context):  # what --help lists: modules not yet imported
            command = group.get_command(context, name)
            assert command is not None, name
            yield f"{path} {name}", command
            if isinstance(command, click.Group):
                yield from walk(command, f"{path} {name}")

    commands = [("dispatcher", main), *walk(main, "dispatcher")]
    assert len(commands) > 20
    for path, command in commands:
        names = [name for param in command.params for name in param.opts]
        assert names.count("-v") == names.count("--verbose") == 1, path
        assert names.count("--log-level") == 1, path


def test_call_starts_the_plugins_its_method_falls_back_to(tmp_path: Path) -> None:
    """``dispatcher call`` starts only the plugin it calls, and now what it falls back to:
    a fallback to another plugin answered ``plugin_not_found`` there (the library fell
    back fine)."""
    down = {
        "id": "echo-remote",
        "version": "1.0.0",
        "target": {"provider": "http", "url": f"http://127.0.0.1:{free_port()}"},
        "methods": {"say": {"fallback": {"plugin": "echo-middle", "on": ["target_unavailable"]}}},
    }
    middle = {
        **down,
        "id": "echo-middle",
        "methods": {"say": {"fallback": {"plugin": "echo", "on": ["target_unavailable"]}}},
    }
    unrelated = {
        **ECHO_LOCAL,
        "id": "unrelated",
        "target": {"provider": "http", "url": "http://127.0.0.1:9"},
    }
    manifest = str(write_manifest(tmp_path, ECHO_LOCAL, unrelated, down, middle))
    called = run_cli("-m", manifest, "call", "echo-remote.say", "-p", '{"text": "hi"}')
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["text"] == "hi"


def test_every_command_is_found_in_the_module_the_table_names() -> None:
    """``COMMAND_MODULES`` is how ``dispatcher`` finds a command without importing every
    command's module: it must name each command, and each one's own module."""
    import importlib

    from dispatcher.cli import COMMAND_MODULES, main

    modules = {f"dispatcher.cli.{module}" for module in COMMAND_MODULES.values()}
    for module in sorted(modules):
        importlib.import_module(module)
    assert set(main.commands) == set(COMMAND_MODULES)
    for name, command in main.commands.items():
        assert command.callback is not None
        assert command.callback.__module__ == f"dispatcher.cli.{COMMAND_MODULES[name]}", name


def test_a_command_imports_its_own_module_and_not_the_others() -> None:
    """``dispatcher list`` does not pay for ``serve``'s web server, ``bench``'s load
    generator or ``local-lambda``'s emulator: before, every command imported every
    command's module, about half of its start-up."""
    probe = (
        "import sys\n"
        "from dispatcher.cli import main\n"
        f"main(['-m', {str(ROOT / 'plugins.yaml')!r}, 'list'], standalone_mode=False)\n"
        "print(sorted(m for m in sys.modules if m.startswith('dispatcher.cli.')))\n"
        "print('aiohttp.web' in sys.modules)\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    *_, modules, web = shown.stdout.splitlines()
    # The group's own modules (``_app``, ``_output``) and the command's.
    expected = "['dispatcher.cli._app', 'dispatcher.cli._output', 'dispatcher.cli.manifest']"
    assert modules == expected, shown.stdout
    assert web == "False", shown.stdout
