"""A command line refused never has what was refused repeated, in any executable of the
project: every SDK's example plugin (``serve``, ``serve --websocket``, ``connect``),
``dispatcher-plugin`` and the ``dispatcher`` CLI.

A command line can carry a secret where an operator slipped: a mistyped
``--register-etcd-pasword=hunter2``, a gateway URL with its token given to an option that
does not exist, a token pasted as a stray argument. The refusal goes to stderr and from
there to the logs. So an unknown option is named without its value (``unknown option
--name (its value is not shown)``; Go's flag package says ``flag provided but not
defined: -name``), and an unexpected positional argument by its place, counted as the
shell counts ``$1``, ``$2``… (``unexpected argument #4 (its text is not shown)``), never
by its text. An unknown option given with a single dash is named by its place too
(``unknown option (argument #2, its text is not shown)``; click's ``No such option
(argument #2, …)``): what follows the dash may be anything pasted after it, and before,
every SDK showed it whole, and click named its first letter it did not take. The exit
status stays what it was: 1, argparse's and click's usage error 2.

Before, the Java, Rust and TypeScript SDKs quoted the whole argument (``unknown argument
'--url=ws://me:TOKEN@…'``), argparse (the Python SDK, ``dispatcher-plugin``) listed it
(``unrecognized arguments: …``), click (the ``dispatcher`` CLI) quoted a stray argument
and an unknown command's name, and the Go SDK ignored a stray argument, and every flag
after it, and served.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Sequence

import pytest

from tests.conformance.conftest import LANGUAGES, START_TIMEOUT, WEBSOCKET_MODES, executable
from tests.conformance.test_serve_cli import CRASHES
from tests.conftest import ROOT
from tests.services import CLEAN_ENVIRONMENT

#: Distinctive enough that no other text holds it.
SECRET = "s3cr3t" + secrets.token_hex(8)
URL = "ws://127.0.0.1:9/v1/plugins/connect"
#: The exit status of a refused command line: argparse's usage error in Python.
STATUS = {"python": 2}
DIALLING = [language for language in LANGUAGES if "inbound" in WEBSOCKET_MODES.get(language, ())]
SERVING_WEBSOCKET = [
    language for language in LANGUAGES if "websocket" in WEBSOCKET_MODES.get(language, ())
]
ENVIRONMENT = {
    **CLEAN_ENVIRONMENT,
    # dispatcher-plugin and the dispatcher CLI as this checkout has them.
    "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "sdk" / "python"), CLEAN_ENVIRONMENT.get("PYTHONPATH", "")]
    ),
}


def refused(command: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """``command`` run to its end; one that takes the command line and runs on is a
    failure (stopped, with what it printed)."""
    process = subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENVIRONMENT,
    )
    try:
        stdout, stderr = process.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{command} took its command line and ran:\n{stdout}{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def assert_refused_naming(
    done: subprocess.CompletedProcess[str],
    status: int,
    named: str,
    crashes: Sequence[str] = CRASHES,
) -> None:
    """Refused with ``status``, ``named`` in what it said, the secret nowhere, no crash."""
    said = done.stdout + done.stderr
    assert SECRET not in said, f"the refused text shows:\n{said}"
    assert done.returncode == status, (done.returncode, said)
    assert named in done.stderr, f"{named!r} is not named:\n{said}"
    assert not any(crash in said for crash in crashes), said


def assert_begun_with_the_command(done: subprocess.CompletedProcess[str], command: str) -> None:
    """The refusal's line begins with the command refused, ``serve: …`` (argparse's
    ``example_plugin.py serve: error: …`` in Python), as every SDK begins the others of
    that command: Java's began ``unknown option …`` until 2026-12-06."""
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{command}: ") or f" {command}: error: " in line, line


#: (the arguments after the example plugin, what its refusal must name) of each mistake.
SERVE_MISTAKES = {
    "unknown option": (["serve", f"--no-such-flag={SECRET}"], "no-such-flag"),
    "mistyped password flag": (
        ["serve", f"--register-etcd-pasword={SECRET}"],
        "register-etcd-pasword",
    ),
    "token in a URL to an unknown option": (
        ["serve", f"--url=ws://me:{SECRET}@127.0.0.1:9/v1/plugins/connect"],
        "url",
    ),
    "stray argument": (["serve", "--address", "127.0.0.1:0", SECRET], "#4"),
    # What follows a single dash may be anything pasted after it, a token too: by its place.
    "single dash": (["serve", f"-{SECRET}"], "#2"),
    "single dash with a value": (["serve", "--address", "127.0.0.1:0", f"-{SECRET}=1"], "#4"),
}
WEBSOCKET_MISTAKES = {
    "unknown option": (["serve", "--websocket", f"--no-such-flag={SECRET}"], "no-such-flag"),
    "stray argument": (["serve", "--websocket", "--address", "127.0.0.1:0", SECRET], "#5"),
    "single dash": (["serve", "--websocket", f"-{SECRET}"], "#3"),
}
CONNECT_MISTAKES = {
    "unknown option": (["connect", "--url", URL, f"--no-such-flag={SECRET}"], "no-such-flag"),
    "stray argument": (["connect", "--url", URL, SECRET], "#4"),
    "stray argument first": (["connect", SECRET, "--url", URL], "#2"),
    "single dash": (["connect", "--url", URL, f"-{SECRET}"], "#4"),
}


def _cases(
    mode: str, mistakes: dict[str, tuple[list[str], str]], languages: list[str]
) -> list[object]:
    return [
        pytest.param(language, *mistakes[name], id=f"{language}-{mode}-{name}")
        for language in languages
        for name in mistakes
    ]


@pytest.mark.parametrize(
    ("language", "arguments", "named"),
    _cases("serve", SERVE_MISTAKES, LANGUAGES)
    + _cases("websocket", WEBSOCKET_MISTAKES, SERVING_WEBSOCKET)
    + _cases("connect", CONNECT_MISTAKES, DIALLING),
)
def test_an_example_plugin_names_what_it_refuses_without_its_text(
    language: str, arguments: list[str], named: str
) -> None:
    done = refused([str(executable(language)), *arguments])
    assert_refused_naming(done, STATUS.get(language, 1), named)
    assert done.stdout == "", "no handshake line: it must not serve"
    assert_begun_with_the_command(done, arguments[0])


PREFIX = "/linchkit/plugins/example"

#: A flag of one WebSocket mode given to the other, or a registry flag to a WebSocket
#: server (no dispatcher finds one in a registry): refused, by the flag's name, never
#: dropped. Before, Python's ``serve --websocket`` served past a ``--url`` and its
#: ``connect`` dialled past an ``--address`` or a ``--websocket``; Go's, Rust's and
#: TypeScript's ``serve --websocket`` served past every registry flag but
#: ``--register-etcd``. An SDK without a WebSocket server (Java's) refuses
#: ``--websocket`` itself, by name, whatever comes with it.
WEBSOCKET_MODE_MISTAKES = {
    "registry etcd": (
        ["serve", "--websocket", f"--register-etcd=http://me:{SECRET}@127.0.0.1:2379"],
        "register-etcd",
    ),
    "connect's url": (["serve", "--websocket", "--url", URL], "url"),
    "connect's url with a token": (
        ["serve", "--websocket", f"--url=ws://me:{SECRET}@127.0.0.1:9/v1/plugins/connect"],
        "url",
    ),
    "registry prefix": (["serve", "--websocket", "--register-prefix", PREFIX], "register-prefix"),
    "advertised address": (
        ["serve", "--websocket", f"--advertise={SECRET}.example:1"],
        "advertise",
    ),
}
WITHOUT_A_WEBSOCKET_SERVER = {
    "websocket with registry etcd": (
        ["serve", "--websocket", f"--register-etcd=http://me:{SECRET}@127.0.0.1:2379"],
        "serve: unknown option --websocket",
    ),
}
CONNECT_MODE_MISTAKES = {
    "serve's address": (["connect", "--url", URL, "--address", "127.0.0.1:0"], "address"),
    "serve's port": (["connect", "--url", URL, "--port", "1"], "port"),
    "serve's switch": (["connect", "--url", URL, "--websocket"], "websocket"),
    "a registry flag": (["connect", "--url", URL, "--register-prefix", PREFIX], "register-prefix"),
}


@pytest.mark.parametrize(
    ("language", "arguments", "named"),
    _cases("websocket", WEBSOCKET_MODE_MISTAKES, SERVING_WEBSOCKET)
    + _cases(
        "no-websocket",
        WITHOUT_A_WEBSOCKET_SERVER,
        [language for language in LANGUAGES if language not in SERVING_WEBSOCKET],
    )
    + _cases("connect", CONNECT_MODE_MISTAKES, DIALLING),
)
def test_a_flag_of_another_mode_is_refused_not_dropped(
    language: str, arguments: list[str], named: str
) -> None:
    done = refused([str(executable(language)), *arguments])
    assert_refused_naming(done, STATUS.get(language, 1), named)
    assert done.stdout == "", "no handshake line: it must not serve"
    assert_begun_with_the_command(done, arguments[0])


#: Flags of ``dispatcher-plugin serve`` that no example plugin takes, in either of its
#: ``serve`` modes: uvicorn's ``--http``, the servers' ``--log-level``, and the identity
#: (an example plugin's is its code's). Each refuses them as any unknown option, by name.
DISPATCHER_PLUGIN_FLAGS = {
    "http implementation": (["--http", "h11"], "-http"),
    "log level": (["--log-level", "info"], "-log-level"),
    "plugin id": (["--id", "other"], "-id"),
    "plugin version": (["--version", "2.0.0"], "-version"),
}


@pytest.mark.parametrize(
    ("language", "arguments", "named"),
    [
        pytest.param(language, [*mode, *flags], named, id=f"{language}-{name}-{label}")
        for name, mode, languages in (
            ("serve", ["serve"], LANGUAGES),
            ("websocket", ["serve", "--websocket"], SERVING_WEBSOCKET),
        )
        for language in languages
        for label, (flags, named) in DISPATCHER_PLUGIN_FLAGS.items()
    ],
)
def test_an_example_plugin_refuses_the_flags_only_dispatcher_plugin_takes(
    language: str, arguments: list[str], named: str
) -> None:
    done = refused([str(executable(language)), *arguments])
    assert_refused_naming(done, STATUS.get(language, 1), named)
    assert done.stdout == "", "no handshake line: it must not serve"
    assert_begun_with_the_command(done, arguments[0])


@pytest.mark.parametrize(
    "etcd",
    [
        pytest.param(f"ftp://me:{SECRET}@127.0.0.1:1", id="not http"),
        pytest.param(f"http://me:{SECRET}@127.0.0.1:1", id="credentials"),
        pytest.param(f"http://{SECRET}@127.0.0.1:99999", id="user and a port past 65535"),
    ],
)
@pytest.mark.parametrize("language", LANGUAGES)
def test_an_etcd_url_refused_is_not_repeated_with_its_credentials(language: str, etcd: str) -> None:
    """A flag whose value is a URL shows it masked, or not at all, when it refuses it:
    ``--register-etcd`` (before, Python's quoted a URL whose scheme it refused whole, the
    credentials it would have refused next with it)."""
    done = refused(
        [str(executable(language)), "serve", f"--register-etcd={etcd}", "--register-prefix", PREFIX]
    )
    assert_refused_naming(done, 1, "register-etcd")
    assert done.stdout == "", "no handshake line: it must not serve"


PLUGIN_CLI = [sys.executable, "-m", "linchkit_plugin.cli"]
ENTRY = ["echo_plugin:EchoPlugin", "--path", str(ROOT / "examples" / "python")]


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        pytest.param(["serve", *ENTRY, f"--no-such-flag={SECRET}"], "--no-such-flag", id="option"),
        pytest.param(["serve", *ENTRY, SECRET], "#5", id="stray argument"),
        pytest.param(["serve", *ENTRY, f"-{SECRET}"], "#5", id="single dash"),
        pytest.param([SECRET, *ENTRY], "COMMAND", id="unknown command"),
        pytest.param(
            ["serve", *ENTRY, f"--register-etcd-={SECRET}"],
            "--register-etcd-",
            id="ambiguous abbreviation",
        ),
        pytest.param(["serve", *ENTRY, f"--websocket={SECRET}"], "--websocket", id="switch value"),
        pytest.param(
            ["connect", *ENTRY, "--url", URL, "--id", "e", "--version", "1", SECRET],
            "#11",
            id="connect stray argument",
        ),
    ],
)
def test_dispatcher_plugin_names_what_it_refuses_without_its_text(
    arguments: list[str], named: str
) -> None:
    assert_refused_naming(refused([*PLUGIN_CLI, *arguments]), 2, named)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        pytest.param(["--register-prefix", PREFIX], "--register-prefix", id="registry prefix"),
        pytest.param(
            [f"--advertise=http://{SECRET}.example:1"], "--advertise", id="advertised URL"
        ),
        pytest.param([f"--tls-key=/run/{SECRET}/key.pem"], "--tls-key", id="TLS key"),
        pytest.param(["--uds", f"/run/{SECRET}.sock"], "--uds", id="Unix socket"),
        pytest.param([f"--max-body-bytes={len(SECRET)}"], "--max-body-bytes", id="HTTP limit"),
        pytest.param(
            ["--register-etcd", f"http://me:{SECRET}@127.0.0.1:2379"],
            "--register-etcd",
            id="registry etcd",
        ),
    ],
)
def test_dispatcher_plugin_serve_websocket_refuses_a_flag_it_would_not_use(
    arguments: list[str], named: str
) -> None:
    """A registry flag, the HTTP server's TLS files, Unix socket and limits (but the two
    the WebSocket server applies) are refused as a usage error, as ``--http`` is, rather
    than dropped: before, it served past a registry flag, then refused each with status 1
    and "Error: …", and ``--register-etcd`` so until 2026-12-06 (``LINCHKIT_REGISTER_ETCD``
    still is: a variable is no usage error)."""
    done = refused([*PLUGIN_CLI, "serve", *ENTRY, "--websocket", "--port", "0", *arguments])
    said = f"serve: error: argument {named}: not used over WebSocket (--websocket)"
    assert_refused_naming(done, 2, said)
    assert "usage: dispatcher-plugin serve" in done.stderr
    assert "listening" not in done.stderr, "it must not serve"


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(["--host", SECRET], id="host"),
        pytest.param([f"--port={len(SECRET)}"], id="port"),
    ],
)
def test_dispatcher_plugin_serve_on_a_unix_socket_refuses_a_host_or_port(
    arguments: list[str],
) -> None:
    """It listens on the socket, not on --host/--port: given with it they are refused as
    a usage error, naming the flag, never its value. Before, they were dropped."""
    done = refused([*PLUGIN_CLI, "serve", *ENTRY, "--uds", f"/nowhere/{SECRET}.sock", *arguments])
    said = f"serve: error: argument {arguments[0].split('=')[0]}: not used with a Unix socket"
    assert_refused_naming(done, 2, said)
    assert "usage: dispatcher-plugin serve" in done.stderr
    assert "listening" not in done.stderr, "it must not serve"


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(["--http", "h11"], id="http"),
        pytest.param(["--http=auto"], id="http with its value"),
        pytest.param(["--ht", "httptools"], id="http abbreviated"),
    ],
)
def test_dispatcher_plugin_serve_websocket_refuses_the_http_implementation(
    arguments: list[str],
) -> None:
    """``--http`` picks uvicorn's HTTP implementation; the WebSocket server is aiohttp's:
    refused as a usage error, as ``connect`` refuses a flag of ``serve``. Before, it was
    dropped and the plugin served. (``LINCHKIT_PLUGIN_HTTP`` is not refused:
    tests/test_python_plugin_server.py.)"""
    done = refused([*PLUGIN_CLI, "serve", *ENTRY, "--websocket", "--port", "0", *arguments])
    assert_refused_naming(done, 2, "serve: error: argument --http: not used over WebSocket")
    assert "usage: dispatcher-plugin serve" in done.stderr
    assert "listening" not in done.stderr, "it must not serve"


DISPATCHER_CLI = [sys.executable, "-m", "dispatcher.cli", "-m", str(ROOT / "plugins.yaml")]


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        pytest.param(["validate", SECRET], "#4", id="stray argument"),
        pytest.param(["list", "-o", "json", SECRET, "x"], "#6", id="two stray arguments"),
        pytest.param([SECRET], "No such command (argument #3", id="unknown command"),
        pytest.param(["validate", f"--no-such-flag={SECRET}"], "--no-such-flag", id="option"),
        # By its place, as the SDKs name it: click named the first letter it did not take
        # as a short option ("No such option '-s'"), an option nobody typed.
        pytest.param(
            ["validate", f"-{SECRET}"],
            "No such option (argument #4, its text is not shown)",
            id="single dash",
        ),
        pytest.param(
            ["validate", f"-v{SECRET}"],
            "No such option (argument #4, its text is not shown)",
            id="single dash after a short option it takes",
        ),
        pytest.param(
            [f"-{SECRET}", "validate"],
            "No such option (argument #3, its text is not shown)",
            id="single dash before the command",
        ),
        pytest.param(
            ["call", "echo.echo", "-p", "{}", f"-x{SECRET}"],
            "No such option (argument #7, its text is not shown)",
            id="single dash after an option's value",
        ),
        pytest.param(["call", "echo.echo", f"--tokn={SECRET}"], "--tokn", id="mistyped option"),
    ],
)
def test_the_dispatcher_cli_names_what_it_refuses_without_its_text(
    arguments: list[str], named: str
) -> None:
    # click's own refusal reads "Error: …": no crash.
    assert_refused_naming(refused([*DISPATCHER_CLI, *arguments]), 2, named, ("Traceback",))
