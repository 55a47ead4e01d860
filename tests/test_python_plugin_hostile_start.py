"""``dispatcher-plugin serve`` against a start that goes wrong, and settings that lie.

* A SIGTERM or SIGINT while the plugin's ``init`` or ``start`` hook hung was noted and
  ignored, over HTTP and WebSocket: only SIGKILL ended the process. It ends it now, in one
  line, exit 1.
* A plugin that cannot be imported (a syntax error, a module raising as it is imported, a
  relative entrypoint), made (its exception's ``__repr__`` raising) or started (a hook
  raising, ``sys.exit()`` in one), TLS files that are no PEM, a file where the Unix socket
  goes: each was a traceback, or uvicorn's two log lines and exit 3. One ``serve:`` line and
  exit 1 now.
* ``LINCHKIT_PLUGIN_WEBSOCKET=yes`` (``True``, ``on``, ``2``…) served HTTP unsaid; a timeout
  of ``inf`` or ``1e308`` turned the slowloris guard off; ``٣٣٣٣`` and ``1_000`` were taken
  for numbers. Each is refused in one line naming the variable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_python_plugin_server import assert_one_error_line

START_PLUGIN = """
import asyncio
import pathlib
import sys
import time

from linchkit_plugin import Plugin

#: Written by a hook as it begins: the test signals the process only then.
BEGAN = pathlib.Path(__file__).with_name("hook-began")


def began(hook):
    # Said whole at once (a rename): the test never reads the file still empty.
    partial = BEGAN.with_name("hook-began.partial")
    partial.write_text(hook)
    partial.rename(BEGAN)


class BadText(Exception):
    def __str__(self):
        raise RuntimeError("str boom")

    def __repr__(self):
        raise RuntimeError("repr boom")


class InitHangs(Plugin):
    async def init(self, config):
        began("init")
        await asyncio.sleep(3600)


class SyncInitHangs(Plugin):
    def init(self, config):
        began("init")
        time.sleep(3600)


class StartHangs(Plugin):
    async def start(self):
        began("start")
        await asyncio.sleep(3600)


class InitRaises(Plugin):
    async def init(self, config):
        raise RuntimeError("init hook boom")


class InitExits(Plugin):
    async def init(self, config):
        sys.exit(5)


class StartRaisesBadText(Plugin):
    async def start(self):
        raise BadText()


class MadeWithBadText(Plugin):
    def __init__(self):
        raise BadText()
"""

PLUGIN_CLI = [sys.executable, "-m", "linchkit_plugin.cli"]
#: Bounds a run of the executable: the bugs here kept it running for ever.
RUN_TIMEOUT = 60
#: How long a hook may take to begin on a loaded machine (the interpreter starts first).
HOOK_BEGINS_WITHIN = 30.0
#: How soon after the signal the process must be gone: "promptly", with room for a load.
GONE_WITHIN = 10.0
MODES = {"http": [], "websocket": ["--websocket"]}


@pytest.fixture
def plugin_folder(tmp_path: Path) -> Path:
    (tmp_path / "start_plugin.py").write_text(START_PLUGIN)
    (tmp_path / "syntax_error.py").write_text("def f(:\n    pass\n")
    (tmp_path / "raises_at_import.py").write_text('raise RuntimeError("import boom")\n')
    return tmp_path


def _environment(**added: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("LINCHKIT_PLUGIN")}
    return {**inherited, **added}


def _command(folder: Path, entrypoint: str, *options: str) -> list[str]:
    return [*PLUGIN_CLI, "serve", entrypoint, "--path", str(folder), *options]


def run_serve(
    folder: Path, entrypoint: str, *options: str, **environment: str
) -> subprocess.CompletedProcess[str]:
    """``serve entrypoint`` from ``folder``, run to its end, without this process's
    ``LINCHKIT_PLUGIN_*`` variables, ``environment`` added."""
    return subprocess.run(
        _command(folder, entrypoint, *options),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env=_environment(**environment),
    )


# 1. A signal while init/start hangs


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize(
    ("plugin", "hook"),
    [("InitHangs", "init"), ("SyncInitHangs", "init"), ("StartHangs", "start")],
)
def test_a_signal_while_init_or_start_hangs_ends_the_process(
    plugin_folder: Path, mode: str, signal_number: signal.Signals, plugin: str, hook: str
) -> None:
    process = subprocess.Popen(
        _command(plugin_folder, f"start_plugin:{plugin}", "--port", "0", *MODES[mode]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_environment(),
    )
    try:
        began = plugin_folder / "hook-began"
        deadline = time.monotonic() + HOOK_BEGINS_WITHIN
        while not began.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"the {hook} hook never began"
            time.sleep(0.05)
        assert began.read_text() == hook
        process.send_signal(signal_number)
        try:
            stdout, stderr = process.communicate(timeout=GONE_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {GONE_WITHIN} s after {signal_number.name}")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1, stderr
    assert stderr == (
        f"serve: {signal_number.name} before the plugin's init/start finished:"
        " exiting without serving\n"
    )
    assert stdout == ""


# 2. A start that fails: one line, exit 1


@pytest.mark.parametrize(
    ("entrypoint", "said"),
    [
        ("syntax_error:X", "cannot load plugin 'syntax_error:X': SyntaxError: invalid syntax"),
        (
            "raises_at_import:X",
            "cannot load plugin 'raises_at_import:X': RuntimeError: import boom",
        ),
        ("../etc:X", "cannot load plugin '../etc:X': TypeError: "),
        (
            "start_plugin:MadeWithBadText",
            "cannot instantiate plugin 'start_plugin:MadeWithBadText': BadText (its text could"
            " not be read)",
        ),
    ],
)
@pytest.mark.parametrize("mode", list(MODES))
def test_a_plugin_that_cannot_be_imported_or_made_is_one_line(
    plugin_folder: Path, entrypoint: str, said: str, mode: str
) -> None:
    done = run_serve(plugin_folder, entrypoint, "--port", "0", *MODES[mode])
    assert_one_error_line(done, said)


@pytest.mark.parametrize(
    ("plugin", "said"),
    [
        ("InitRaises", "the plugin's init hook failed: RuntimeError: init hook boom"),
        ("InitExits", "the plugin's init hook failed: SystemExit: 5"),
        (
            "StartRaisesBadText",
            "the plugin's start hook failed: BadText (its text could not be read)",
        ),
    ],
)
@pytest.mark.parametrize("mode", list(MODES))
def test_a_failing_init_or_start_hook_is_one_line_and_exit_1(
    plugin_folder: Path, plugin: str, said: str, mode: str
) -> None:
    done = run_serve(plugin_folder, f"start_plugin:{plugin}", "--port", "0", *MODES[mode])
    assert_one_error_line(done, said)
    assert "Application startup failed" not in done.stderr


@pytest.mark.parametrize("source", ["flags", "environment"])
def test_tls_files_that_are_no_pem_are_one_line(plugin_folder: Path, source: str) -> None:
    not_pem = plugin_folder / "not.pem"
    not_pem.write_text("hello, no certificate here\n")
    if source == "flags":
        options, environment = ["--tls-cert", str(not_pem), "--tls-key", str(not_pem)], {}
        named = "--tls-cert, --tls-key"
    else:
        options = []
        environment = {
            "LINCHKIT_PLUGIN_TLS_CERT": str(not_pem),
            "LINCHKIT_PLUGIN_TLS_KEY": str(not_pem),
        }
        named = "LINCHKIT_PLUGIN_TLS_CERT, LINCHKIT_PLUGIN_TLS_KEY"
    done = run_serve(
        plugin_folder, "start_plugin:InitRaises", "--port", "0", *options, **environment
    )
    assert_one_error_line(done, f"{named}: cannot use them as a PEM certificate and its key")


def test_a_regular_file_where_the_unix_socket_goes_is_one_line(plugin_folder: Path) -> None:
    taken = plugin_folder / "taken"
    taken.write_text("not a socket")
    done = run_serve(plugin_folder, "start_plugin:InitRaises", "--uds", str(taken))
    assert_one_error_line(
        done, f"cannot listen on the Unix socket {taken}: something that is no socket"
    )
    assert taken.read_text() == "not a socket"


# 3. LINCHKIT_PLUGIN_WEBSOCKET spelled otherwise


@pytest.mark.parametrize("text", ["True", "TRUE", "yes", "on", "2", " 1", "1 "])
def test_a_websocket_variable_neither_true_nor_false_is_refused(
    plugin_folder: Path, text: str
) -> None:
    done = run_serve(
        plugin_folder, "start_plugin:InitRaises", "--port", "0", LINCHKIT_PLUGIN_WEBSOCKET=text
    )
    assert_one_error_line(
        done,
        "LINCHKIT_PLUGIN_WEBSOCKET must be 1 or true (WebSocket), or 0, false or empty (HTTP),"
        f" not {text!r}",
    )


@pytest.mark.parametrize(
    ("text", "mode"), [("0", "HTTP"), ("false", "HTTP"), ("", "HTTP"), ("true", "WebSocket")]
)
def test_the_websocket_variable_s_own_spellings_are_taken(
    plugin_folder: Path, text: str, mode: str
) -> None:
    """The plugin's init fails: the run ends, having got as far as starting it."""
    done = run_serve(
        plugin_folder, "start_plugin:InitRaises", "--port", "0", LINCHKIT_PLUGIN_WEBSOCKET=text
    )
    assert_one_error_line(done, "the plugin's init hook failed")


# 4. Numbers that are no sane limit, or spelled as no other SDK reads them


@pytest.mark.parametrize(
    ("variable", "text", "said"),
    [
        ("BODY_TIMEOUT", "inf", "must be a number, not 'inf' (ASCII digits only)"),
        ("HEADER_TIMEOUT", "1e308", "must be a number, not '1e308' (ASCII digits only)"),
        ("KEEP_ALIVE_TIMEOUT", "nan", "must be a number, not 'nan' (ASCII digits only)"),
        ("HEADER_TIMEOUT", "86401", "must be a positive number of seconds, at most 86400"),
        ("BODY_TIMEOUT", "1" + "0" * 400, "must be a positive number of seconds, at most 86400"),
        ("PORT", "٣٣٣٣", "must be a whole number, not '٣٣٣٣' (ASCII digits only)"),
        ("MAX_BODY_BYTES", "1_000", "must be a whole number, not '1_000' (ASCII digits only)"),
        ("MAX_CONNECTIONS", " 5", "must be a whole number, not ' 5' (ASCII digits only)"),
        ("MAX_BODY_BYTES", str(1 << 40), f"must be at most {1 << 30}, not {1 << 40}"),
        ("MAX_BATCH_ITEMS", "10000000", "must be at most 1000000, not 10000000"),
    ],
)
def test_a_number_variable_that_is_no_sane_limit_is_refused(
    plugin_folder: Path, variable: str, text: str, said: str
) -> None:
    options = [] if variable == "PORT" else ["--port", "0"]
    done = run_serve(
        plugin_folder, "start_plugin:InitRaises", *options, **{f"LINCHKIT_PLUGIN_{variable}": text}
    )
    assert_one_error_line(done, f"LINCHKIT_PLUGIN_{variable} {said}")


@pytest.mark.parametrize(
    ("flag", "text"), [("--port", "٣٣٣٣"), ("--max-body-bytes", "1_000"), ("--body-timeout", "inf")]
)
def test_a_number_flag_spelled_otherwise_is_a_usage_error(
    plugin_folder: Path, flag: str, text: str
) -> None:
    done = run_serve(plugin_folder, "start_plugin:InitRaises", "--port", "0", flag, text)
    assert done.returncode == 2, done.stderr
    assert f"argument {flag}: must be a" in done.stderr
    assert "Traceback" not in done.stderr
