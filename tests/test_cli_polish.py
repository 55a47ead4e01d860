"""A plugin author's first hour: ``dispatcher logs``, ``remove``, ``schema``, the errors table.

``logs`` runs against a real subprocess plugin (the CLI in a process of its own, stopped
with Ctrl-C) and real containers on the local engine; ``schema`` validates the repo's own
manifests with jsonschema.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

import linchkit_plugin.errors as wire_errors
from dispatcher import Dispatcher
from dispatcher.cli import main
from dispatcher.cli.logs import _follow_all, _print_each
from dispatcher.cli.schema import manifest_json_schema
from linchkit_plugin.errors import DispatchError, PluginError
from providers._http_common import status_error
from providers.base import LogsUnavailable
from providers.subprocess import SubprocessProvider
from providers.subprocess.output import OutputRing
from tests.conftest import LOCAL_TARGET, ROOT, echo_plugin, manifest

PLUGINS = ROOT / "tests" / "plugins"
SOURCE_PATH = os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python")])
CHATTY_IMAGE = "linchkit-test/chatty:1"


def crashing_plugin(**env: str) -> dict[str, Any]:
    """The supervision tests' plugin: says ``crashing plugin PID started`` on stderr."""
    return {
        "id": "crashing",
        "version": "1.0.0",
        "target": {
            "provider": "subprocess",
            "command": [sys.executable, str(PLUGINS / "crashing_plugin.py")],
            "env": {"PYTHONPATH": SOURCE_PATH, **env},
        },
        "methods": {"pid": {}, "echo": {}},
    }


def write_manifest(folder: Path, *plugins: dict[str, Any]) -> Path:
    path = folder / "plugins.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "plugins": list(plugins)}), encoding="utf-8")
    return path


def cli_environment() -> dict[str, str]:
    # faulthandler: a command that does not end is sent SIGABRT, and its threads' stacks
    # say where it hung (``stacks_of``).
    return {**os.environ, "PYTHONPATH": SOURCE_PATH, "PYTHONFAULTHANDLER": "1"}


def stacks_of(process: subprocess.Popen[str]) -> str:
    """What a command that did not end was doing: SIGABRT has faulthandler print every
    thread's stack on its stderr (``cli_environment``) before the process dies."""
    process.send_signal(signal.SIGABRT)
    try:
        _, errors = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        _, errors = process.communicate()
    return errors


async def eventually(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- logs: the ring behind a subprocess plugin's output ---------------------------------


async def test_output_ring_keeps_the_last_lines_and_cuts_long_ones() -> None:
    ring = OutputRing(capacity=3, max_line_chars=10)
    for number in range(5):
        ring.append(f"line {number}")
    ring.append("x" * 50)
    assert ring.last(10) == ["line 3", "line 4", "x" * 10 + " …(cut)"]
    assert ring.last(1) == ["x" * 10 + " …(cut)"]
    assert ring.last(0) == []
    assert "3/3 lines" in repr(ring)


async def test_a_follower_that_falls_behind_is_told_what_it_missed() -> None:
    ring = OutputRing(capacity=4)
    ring.append("old")
    reader = ring.follow(lines=1)
    assert await anext(reader) == "old"
    for number in range(10):  # a flood while the reader does not read: its queue is bounded
        ring.append(f"new {number}")
    seen = [await anext(reader) for _ in range(5)]
    assert seen == ["new 0", "new 1", "new 2", "new 3", "… 6 lines missed: the reader fell behind"]
    ring.append("after")
    assert await anext(reader) == "after"
    await reader.aclose()
    assert "followers=0" in repr(ring)


async def test_subprocess_logs_keep_the_childs_stderr_across_a_restart() -> None:
    plugin = crashing_plugin(CRASH_AFTER_MS="300")
    plugin["target"] |= {"restart_backoff_ms": 10}
    async with Dispatcher(manifest(plugin)) as dispatcher:
        provider = dispatcher.providers["subprocess"]
        assert isinstance(provider, SubprocessProvider)
        spec = dispatcher.manifest.plugins[0]
        (process,) = provider._processes.values()

        def started_lines() -> list[str]:
            return [line for line in process.output.last(100) if line.endswith(" started")]

        await eventually(lambda: len(started_lines()) >= 2)  # the first launch and the restart
        lines = [line async for line in provider.logs(spec, spec.target, follow=False, lines=100)]
        assert [line for line in lines if line.endswith(" started")] == started_lines()
        last = [line async for line in provider.logs(spec, spec.target, follow=False, lines=1)]
        assert last == lines[-1:]


async def test_providers_without_logs_raise_a_typed_error() -> None:
    async with Dispatcher(manifest(echo_plugin("echo", LOCAL_TARGET))) as dispatcher:
        spec = dispatcher.manifest.plugins[0]
        provider = dispatcher.providers[spec.target.provider]
        with pytest.raises(LogsUnavailable, match="the local provider keeps no logs") as caught:
            async for _ in provider.logs(spec, spec.target, follow=False, lines=10):
                pass
        assert caught.value.type == "provider_error"


def test_cli_logs_follows_a_subprocess_plugin_until_ctrl_c(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, crashing_plugin())
    command = [sys.executable, "-m", "dispatcher.cli", "-m", str(path), "logs", "crashing", "-f"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_environment()
    ) as cli:
        assert cli.stdout is not None
        line = cli.stdout.readline()  # blocks until the plugin has written it
        found = re.fullmatch(r"crashing plugin (\d+) started\n", line)
        assert found, line
        plugin_pid = int(found[1])
        assert alive(plugin_pid)
        cli.send_signal(signal.SIGINT)
        # Read both pipes while waiting: a command blocked writing to a full pipe would
        # never exit, and what it wrote says why it did not.
        try:
            _, errors = cli.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"Ctrl-C did not end the command within 30 s; stderr: {stacks_of(cli)}")
        assert cli.returncode == 0, errors
    assert not alive(plugin_pid), "Ctrl-C stops the plugin the command started"


def test_cli_logs_shows_every_line_escaped_tabs_as_they_are(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A container's or a function's output reaches the terminal through here as it was
    # written (the subprocess provider's is escaped already, as it is logged).
    async def lines() -> AsyncIterator[str]:
        yield "\x1b]0;owned\x07title\x1b[2J\tat Plugin.run"

    for show in (_print_each, _follow_all):
        assert asyncio.run(show([lines()])) == []
        assert capsys.readouterr().out == "\\x1b]0;owned\\x07title\\x1b[2J\tat Plugin.run\n"


def test_cli_logs_of_a_provider_without_logs_says_so(tmp_path: Path) -> None:
    local = {
        "id": "echo",
        "version": "1.0.0",
        "target": {"provider": "local", "entrypoint": "echo_plugin:EchoPlugin"},
        "methods": {"say": {}},
    }
    path = write_manifest(tmp_path, local)
    result = CliRunner().invoke(main, ["-m", str(path), "logs", "echo"])
    assert result.exit_code == 1
    assert "the local provider keeps no logs" in result.output
    unknown = CliRunner().invoke(main, ["-m", str(path), "logs", "ecoh"])
    assert unknown.exit_code == 2
    assert "no plugin 'ecoh' in the manifest (known: echo)" in unknown.output


def test_cli_health_refuses_a_timeout_it_cannot_keep(tmp_path: Path) -> None:
    local = {
        "id": "echo",
        "version": "1.0.0",
        "target": {"provider": "local", "entrypoint": "echo_plugin:EchoPlugin"},
        "methods": {"say": {}},
    }
    path = write_manifest(tmp_path, local)
    for bad in ("0", "-1", "nan", "1e9", "soon"):
        result = CliRunner().invoke(main, ["-m", str(path), "health", "--timeout", bad])
        assert result.exit_code == 2, (bad, result.output)
        assert "--timeout" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["-m", str(path), "health", "--timeout", "2.5"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "command",
    [
        ["health", "--timeout"],
        # A call's: 0 or less was a deadline_exceeded answered as retryable, a retry loop's
        # spin; infinity, an invalid_params from deep inside.
        ["call", "echo.say", "--timeout"],
        ["job", "some-id", "--wait"],
        ["serve", "--grace"],
        ["serve", "--watch"],
        ["top", "--interval"],
    ],
)
def test_no_seconds_option_takes_nan_or_infinity(tmp_path: Path, command: list[str]) -> None:
    """NaN passes every range check (each comparison is false): a wait of NaN seconds
    would never end. Every option given in seconds refuses it, and infinity, as usage."""
    path = write_manifest(
        tmp_path,
        {
            "id": "echo",
            "version": "1.0.0",
            "target": {"provider": "local", "entrypoint": "echo_plugin:EchoPlugin"},
            "methods": {"say": {}},
        },
    )
    bad_values = ("nan", "NaN", "inf", "-inf", *(("0", "-1") if command[0] == "call" else ()))
    for bad in bad_values:
        result = CliRunner().invoke(main, ["-m", str(path), *command, bad])
        assert result.exit_code == 2, (bad, result.output)
        assert command[-1] in result.output, result.output


# -- logs: containers on the real engine --------------------------------------------------


CHATTY_PLUGIN = """
import sys

from linchkit_plugin import Plugin


class ChattyPlugin(Plugin):
    async def start(self) -> None:
        print("chatty plugin started", file=sys.stderr, flush=True)

    async def say(self, text: str) -> str:
        print(f"said {text}", file=sys.stderr, flush=True)
        return text
"""


@pytest.fixture(scope="module")
def chatty_box(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A plugin that writes to stderr, in an image built on the offline base image (the
    engine and the base image come from the same idempotent scripts as test_docker's)."""
    subprocess.run([str(ROOT / "scripts" / "start-docker.sh")], check=True)
    subprocess.run(
        [str(ROOT / "infra" / "docker" / "build-base-image.sh")],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        stdout=subprocess.DEVNULL,
    )
    context = tmp_path_factory.mktemp("chatty")
    (context / "chatty_plugin.py").write_text(CHATTY_PLUGIN, encoding="utf-8")
    plugin = {
        "id": "chatty-box",
        "version": "1.0.0",
        "target": {
            "provider": "docker",
            "image": CHATTY_IMAGE,
            "build": {"context": str(context), "entrypoint": "chatty_plugin:ChattyPlugin"},
        },
        "methods": {"say": {}},
    }
    from providers.docker import DockerProvider

    async def deploy() -> None:
        spec = manifest(plugin).plugins[0]
        async with DockerProvider() as provider:
            await provider.deployer().apply(spec, spec.target)

    asyncio.run(deploy())
    return plugin


@pytest.mark.docker
async def test_docker_logs_read_the_plugins_containers_of_another_dispatcher(
    tmp_path: Path, chatty_box: dict[str, Any]
) -> None:
    path = write_manifest(tmp_path, chatty_box)
    async with Dispatcher(manifest(chatty_box)) as host:  # the host app, with a warm container
        await host.call("chatty-box", "say", {"text": "hi"})
        (pool,) = host.providers["docker"]._pools.values()  # type: ignore[attr-defined]
        (container,) = pool.ready()

        # Another process (the CLI) finds the host's container by its plugin label.
        command = [sys.executable, "-m", "dispatcher.cli", "-m", str(path), "logs", "chatty-box"]
        result = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, env=cli_environment()
        )
        assert result.returncode == 0, result.stderr
        # Only this container's lines: a test run beside this one may have its own.
        ours = [line for line in result.stdout.splitlines() if line.startswith(container.name)]
        assert f"{container.name} | chatty plugin started" in ours
        assert ours[-1] == f"{container.name} | said hi"

        result = await asyncio.to_thread(
            subprocess.run,
            [*command[:-1], "-n", "1", "chatty-box"],
            capture_output=True,
            text=True,
            env=cli_environment(),
        )
        ours = [line for line in result.stdout.splitlines() if line.startswith(container.name)]
        assert ours == [f"{container.name} | said hi"]


@pytest.mark.docker
# Now and then aiohttp reports the engine connection of a follow stream cancelled mid-read
# as unclosed when the test's dispatcher closes its client (each stream is closed with
# aclosing, and the provider's own session is closed in aclose); seen before this test
# followed whole outputs, and not a leak across calls: the session owning it is gone.
@pytest.mark.filterwarnings("ignore:Unclosed connection:ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_docker_logs_follow_a_container_that_starts_meanwhile(
    chatty_box: dict[str, Any],
) -> None:
    async with Dispatcher(manifest(chatty_box)) as host:
        provider = host.providers["docker"]
        provider.logs_poll_s = 0.1  # type: ignore[attr-defined]
        spec = host.manifest.plugins[0]
        # lines=-1: a container's whole output, whether the reader's first look (which
        # shows only the last `lines` of what already runs) sees it or a later one does;
        # on a loaded machine the first look can end after the container has started.
        reader = provider.logs(spec, spec.target, follow=True, lines=-1)
        first = asyncio.ensure_future(anext(reader))
        await asyncio.sleep(0.3)  # the reader has looked, and found no container
        assert not first.done()
        await host.call("chatty-box", "say", {"text": "cold start"})
        (pool,) = provider._pools.values()  # type: ignore[attr-defined]
        (container,) = pool.ready()
        lines = [await asyncio.wait_for(first, 60)]
        while lines[-1] != f"{container.name} | said cold start":
            lines.append(await asyncio.wait_for(anext(reader), 60))
        # The plugin's own lines, in order; the SDK's server also says where it listens.
        plugin_lines = [line for line in lines if "dispatcher-plugin:" not in line]
        assert plugin_lines == [
            f"{container.name} | chatty plugin started",
            f"{container.name} | said cold start",
        ]
        await host.call("chatty-box", "say", {"text": "again"})
        assert await asyncio.wait_for(anext(reader), 60) == f"{container.name} | said again"
        await reader.aclose()


@pytest.mark.docker
# As above: aiohttp may report the engine connection of a follow stream cancelled mid-read.
@pytest.mark.filterwarnings("ignore:Unclosed connection:ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_docker_logs_follow_a_container_the_reader_first_saw_created_not_started(
    chatty_box: dict[str, Any],
) -> None:
    # The engine ends a follow of a container that is created but not started yet at once,
    # with nothing: a reader whose look fell between the two (a pool starting a container
    # creates it, then starts it) never followed it again and missed its whole output.
    from providers.docker.engine import LABEL_PLUGIN

    async with Dispatcher(manifest(chatty_box)) as host:
        provider = host.providers["docker"]
        provider.logs_poll_s = 0.1  # type: ignore[attr-defined]
        spec = host.manifest.plugins[0]
        script = "print('started late', flush=True); import time; time.sleep(60)"
        label = f"{LABEL_PLUGIN}={spec.key}"
        created = await docker_cli(
            *("create", "--network", "none", "--label", label, "--entrypoint", "/usr/bin/python3"),
            *(CHATTY_IMAGE, "-c", script),
        )
        try:
            reader = provider.logs(spec, spec.target, follow=True, lines=-1)
            first = asyncio.ensure_future(anext(reader))
            await asyncio.sleep(0.5)  # several looks, each finding it created, not started
            assert not first.done()
            await docker_cli("start", created)
            assert await asyncio.wait_for(first, 30) == f"{await name_of(created)} | started late"
            await reader.aclose()
        finally:
            await docker_cli("rm", "-f", created)


async def docker_cli(*arguments: str) -> str:
    """``docker …``'s output; the test fails with its error output if it fails."""
    process = await asyncio.create_subprocess_exec(
        "docker", *arguments, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode().strip()


async def name_of(container: str) -> str:
    return (await docker_cli("inspect", "-f", "{{.Name}}", container)).lstrip("/")


@pytest.mark.docker
async def test_docker_logs_without_a_container_say_what_to_do(chatty_box: dict[str, Any]) -> None:
    async with Dispatcher(manifest(chatty_box)) as quiet:
        spec = quiet.manifest.plugins[0]
        provider = quiet.providers["docker"]
        with pytest.raises(LogsUnavailable, match=f"no container of {CHATTY_IMAGE}.*--follow"):
            async for _ in provider.logs(spec, spec.target, follow=False, lines=5):
                pass


# -- remove -------------------------------------------------------------------------------


def knative_plugin() -> dict[str, Any]:
    return {
        "id": "echo-knative",
        "version": "1.0.0",
        "target": {
            "provider": "knative",
            "service": "echo",
            "ingress": "http://127.0.0.1:8080",
            "deploy": {"image": "example/echo:1"},
        },
        "methods": {"say": {}},
    }


def test_remove_is_deploy_remove_under_its_own_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_manifest(tmp_path, knative_plugin())
    runner = CliRunner()
    deployed = runner.invoke(main, ["-m", str(path), "deploy", "echo-knative"])
    assert deployed.exit_code == 0, deployed.output
    rendered = tmp_path / "infra" / "knative" / "default" / "echo.yaml"
    assert rendered.is_file()

    dry = runner.invoke(main, ["remove", "echo-knative", "--dry-run", "-m", str(path)])
    assert dry.exit_code == 0, dry.output
    assert "would remove" in dry.output
    assert rendered.is_file()

    removed = runner.invoke(main, ["-m", str(path), "remove", "echo-knative"])
    assert removed.exit_code == 0, removed.output
    assert not rendered.exists()
    again = runner.invoke(main, ["-m", str(path), "deploy", "--remove", "echo-knative"])
    assert "knative service default/echo: nothing to remove" in again.output

    nothing_named = runner.invoke(main, ["-m", str(path), "remove"])
    assert nothing_named.exit_code == 2
    assert "Missing argument 'PLUGIN...'" in nothing_named.output
    unknown = runner.invoke(main, ["-m", str(path), "remove", "nope"])
    assert unknown.exit_code == 2
    assert "not in the manifest: 'nope'" in unknown.output


# -- schema -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", ["plugins.yaml", "examples/docker-plugins.yaml"])
def test_schema_accepts_the_repos_manifests(
    validator: jsonschema.Draft202012Validator, path: str
) -> None:
    document = yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))
    assert [error.message for error in validator.iter_errors(document)] == []


def test_schema_rejects_a_typo_where_the_loader_does(
    validator: jsonschema.Draft202012Validator,
) -> None:
    document = yaml.safe_load((ROOT / "plugins.yaml").read_text(encoding="utf-8"))
    document["plugins"][0]["methods"]["say"]["timeot_ms"] = 100
    document["plugins"][1]["target"]["urll"] = "http://x"
    messages = sorted(error.message for error in validator.iter_errors(document))
    assert any("'timeot_ms' was unexpected" in message for message in messages), messages
    # A typo in a target: no provider's model takes it (the message is jsonschema's oneOf).
    assert len(messages) == 2, messages


def test_schema_takes_env_references_where_the_loader_substitutes_them(
    validator: jsonschema.Draft202012Validator,
) -> None:
    document = {
        "version": 1,
        "plugins": [
            {
                "id": "echo",
                "version": "1.0.0",
                "defaults": {"timeout_ms": "${ECHO_TIMEOUT_MS:-2000}", "idempotent": "${RETRY}"},
                "target": {"provider": "http", "url": "http://127.0.0.1:${PORT}"},
                "methods": {"say": {}},
            }
        ],
    }
    assert [error.message for error in validator.iter_errors(document)] == []
    document["plugins"][0]["defaults"]["timeout_ms"] = "soon"
    assert list(validator.iter_errors(document))


def test_schema_names_its_definitions_shortly() -> None:
    schema = manifest_json_schema()
    assert {"PluginSpec", "MethodSpec", "HttpTarget", "LambdaTarget"} <= set(schema["$defs"])
    assert all(len(name) < 40 for name in schema["$defs"])
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_readme_shows_the_yaml_language_server_line() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "# yaml-language-server: $schema=" in readme
    assert "dispatcher schema >" in readme


# -- the errors table ---------------------------------------------------------------------


def readme_error_table() -> list[dict[str, str]]:
    """The rows of the README's errors table, by header."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    return [
        dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")), strict=True))
        for row in rows[1:]  # the |---| line does not start with '| '
    ]


def error_classes() -> list[type[DispatchError]]:
    return [
        value
        for name in wire_errors.__all__
        if isinstance(value := getattr(wire_errors, name), type)
        and issubclass(value, DispatchError)
    ]


def test_errors_table_lists_every_class_with_its_wire_type_and_retryable() -> None:
    rows = {row["class"].strip("`"): row for row in readme_error_table()}
    assert set(rows) == {cls.__name__ for cls in error_classes()}
    for cls in error_classes():
        row = rows[cls.__name__]
        wire = row["wire `type`"]
        if cls is PluginError:
            assert "remote_type" in wire, "a plugin error travels under the plugin's own type"
        else:
            assert wire == f"`{cls.type}`", (cls, wire)
        if cls is DispatchError:
            continue
        retryable = row["retryable"]
        if cls.default_retryable:
            assert retryable.startswith("yes"), (cls, retryable)
        else:
            assert retryable.startswith(("no", "as the plugin says")), (cls, retryable)
        assert row["CLI exit"] in {"1", "2"}, (cls, row)


@pytest.mark.parametrize("status", [401, 403, 404, 408, 413, 418, 429, 500, 502, 503, 504, 307])
def test_errors_table_http_column_matches_the_status_mapping(status: int) -> None:
    rows = {row["class"].strip("`"): row for row in readme_error_table()}
    target = manifest(echo_plugin("echo", LOCAL_TARGET)).plugins[0].target
    error = status_error(status, b"", None, target, location="http://elsewhere/")
    column = rows[type(error).__name__]["HTTP"]
    if status in (307, 418):
        assert column.startswith("3xx") and "any other" in column, column
    else:
        assert str(status) in re.findall(r"\d{3}", column), (status, column)


def test_errors_table_says_how_a_plugin_error_travels() -> None:
    error = PluginError("cannot withdraw 500", remote_type="InsufficientFunds")
    assert error.type == "plugin_error"
    assert error.to_wire()["type"] == "InsufficientFunds"
    row = next(row for row in readme_error_table() if row["class"] == "`PluginError`")
    assert "`InsufficientFunds`" in row["wire `type`"]
    assert '`type == "plugin_error"`' in row["wire `type`"]
