"""The Python SDK's executables against settings and params that cost without bound.

* A plugin class whose ``methods`` is a str (``("a")``, the 1-tuple missing its comma) or a
  set exposed every public method of the class (``drop_all_tables`` too): refused at load.
* A token, certificate or key file that is a device or a FIFO: ``/dev/zero`` grew the
  process by gigabytes in seconds, a FIFO blocked the start for ever. Refused in one line.
* ``invalid_params`` quoted every parameter name the caller sent, whole: a 4 MB answer for
  one long name. Capped: a few names, each cut short, and how many in all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from linchkit_plugin import Plugin, PluginHost
from linchkit_plugin.errors import ProviderError
from tests.test_python_plugin_server import (
    assert_one_error_line,
    call,
    envelope,
    plugin_server,
    run_serve,
)

TYPO_PLUGIN = """
from linchkit_plugin import Plugin


class Fine(Plugin):
    methods = ("public_api",)

    def public_api(self):
        return "fine"


class OneTuple(Plugin):
    methods = ("public_api")  # meant ("public_api",)

    def public_api(self):
        return "fine"

    def drop_all_tables(self):
        return "dropped!"


class ASet(Plugin):
    methods = {"public_api"}

    def public_api(self):
        return "fine"

    def drop_all_tables(self):
        return "dropped!"
"""

PLUGIN_CLI = [sys.executable, "-m", "linchkit_plugin.cli"]
#: Bounds a run of the executable; a FIFO used to block it for ever.
RUN_TIMEOUT = 30


def run_plugin(tmp_path: Path, *args: str, **environment: str) -> subprocess.CompletedProcess[str]:
    """``dispatcher-plugin`` with ``args`` (a command, an entrypoint, its options), the
    folder of ``typo_plugin`` as ``--path``, run to its end without this process's
    ``LINCHKIT_PLUGIN_*`` variables, ``environment`` added."""
    (tmp_path / "typo_plugin.py").write_text(TYPO_PLUGIN)
    command, entrypoint, *options = args
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("LINCHKIT_PLUGIN")}
    return subprocess.run(
        [*PLUGIN_CLI, command, entrypoint, "--path", str(tmp_path), *options],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env={**inherited, **environment},
    )


# 5. ``methods`` that is no list or tuple of names


@pytest.mark.parametrize(
    ("entrypoint", "said"),
    [("typo_plugin:OneTuple", "not a str: 'public_api'"), ("typo_plugin:ASet", "not a set")],
)
@pytest.mark.parametrize("command", ["serve", "connect"])
def test_methods_that_is_no_list_or_tuple_is_refused_at_load(
    tmp_path: Path, entrypoint: str, said: str, command: str
) -> None:
    """Before, ``serve typo_plugin:OneTuple`` served ``drop_all_tables``."""
    flags = (
        ["--port", "0"]
        if command == "serve"
        else ["--url", "ws://127.0.0.1:9/x", "--id", "t", "--version", "1"]
    )
    done = run_plugin(tmp_path, command, entrypoint, *flags)
    assert done.returncode == 1, done.stderr
    class_name = entrypoint.replace(":", ".")
    expected = f"{command}: plugin class {class_name}: `methods` must be a list or tuple of"
    assert done.stderr.startswith(expected), done.stderr
    assert said in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert "drop_all_tables" not in done.stderr and "listening" not in done.stderr


def test_a_host_made_in_process_refuses_such_methods_too() -> None:
    class Typo(Plugin):
        methods = "public_api"  # type: ignore[assignment]

        def public_api(self) -> str:
            return "fine"

        def drop_all_tables(self) -> str:
            return "dropped!"

    with pytest.raises(ProviderError, match="`methods` must be a list or tuple"):
        PluginHost(Typo())


# 6. setting files that are no regular file, or too large to be one


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("source", ["flag", "variable"])
@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_serve_refuses_a_token_file_that_is_a_device_or_a_fifo(
    tmp_path: Path, fifo: Path, source: str, kind: str
) -> None:
    path = "/dev/zero" if kind == "device" else str(fifo)
    if source == "flag":
        done = run_serve("--port", "0", "--token-file", path)
    else:
        done = run_serve("--port", "0", LINCHKIT_PLUGIN_TOKEN_FILE=path)
    assert_one_error_line(done, f"cannot read the token file '{path}': not a regular file")


def test_serve_refuses_a_token_file_too_large_to_be_a_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("x" * (1 << 20))
    done = run_serve("--port", "0", "--token-file", str(token_file))
    assert_one_error_line(done, f"cannot read the token file '{token_file}': larger than")


def test_serve_websocket_refuses_a_token_file_that_is_a_fifo(fifo: Path) -> None:
    done = run_serve("--websocket", "--port", "0", "--token-file", str(fifo))
    assert_one_error_line(done, f"cannot read the token file '{fifo}': not a regular file")


@pytest.mark.parametrize(
    ("flags", "environment", "said"),
    [
        (["--tls-cert", "{fifo}", "--tls-key", "{fifo}"], {}, "--tls-cert: cannot read {fifo}"),
        (["--tls-cert", "{pem}", "--tls-key", "/dev/zero"], {}, "--tls-key: cannot read /dev/zero"),
        (
            ["--tls-cert", "{pem}", "--tls-key", "{pem}"],
            {"LINCHKIT_PLUGIN_CLIENT_CA": "{fifo}"},
            "LINCHKIT_PLUGIN_CLIENT_CA: cannot read {fifo}",
        ),
    ],
)
def test_serve_refuses_tls_files_that_are_devices_or_fifos(
    tmp_path: Path, fifo: Path, flags: list[str], environment: dict[str, str], said: str
) -> None:
    pem = tmp_path / "some.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")

    def filled(text: str) -> str:
        return text.format(fifo=fifo, pem=pem)

    done = run_serve(
        "--port",
        "0",
        *map(filled, flags),
        **{name: filled(value) for name, value in environment.items()},
    )
    assert_one_error_line(done, filled(said) + ": not a regular file")


@pytest.mark.parametrize("setting", ["--ca-file", "--cert-file"])
@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_connect_refuses_tls_files_that_are_devices_or_fifos(
    tmp_path: Path, fifo: Path, setting: str, kind: str
) -> None:
    path = "/dev/zero" if kind == "device" else str(fifo)
    files = [setting, path] if setting == "--ca-file" else [setting, path, "--key-file", path]
    url = ["--url", "wss://127.0.0.1:9/v1/plugins/connect", "--id", "t", "--version", "1"]
    done = run_plugin(tmp_path, "connect", "typo_plugin:Fine", *url, *files)
    assert done.returncode == 2, done.stderr  # connect's status for a file it cannot use
    assert done.stderr.startswith(f"connect: {setting}: cannot read {path}: not a regular"), (
        done.stderr
    )
    assert done.stderr.count("\n") == 1, done.stderr


# 7. ``invalid_params`` quotes a bounded part of what the caller sent


async def test_invalid_params_quotes_a_long_name_cut_short() -> None:
    long_name = "x" * 4_000_000
    async with plugin_server() as port:
        answer = await call(port, envelope("named", {long_name: 1}))
    assert answer.status_code == 200
    error = answer.json()["error"]
    assert error["type"] == "invalid_params", error
    assert len(answer.content) < 2_000, len(answer.content)


async def test_invalid_params_names_a_few_unknown_names_and_how_many() -> None:
    params: dict[str, Any] = {f"k{i}": 0 for i in range(300_000)}
    async with plugin_server() as port:
        answer = await call(port, envelope("named", params))
    error = answer.json()["error"]
    assert error["type"] == "invalid_params", error
    assert len(answer.content) < 2_000, len(answer.content)
    assert "'k0', 'k1', 'k2', 'k3', 'k4' and 299995 more (300000 in all)" in error["message"]
