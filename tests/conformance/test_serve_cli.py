"""``example-plugin serve`` of every SDK as an operator meets it: ``--help``, a mistyped
``--address``, a port already taken. Each ends at once with one clear line and status 1
(``--help``: the usage and the environment the service reads, status 0), never a stack
trace, never serving somewhere else than asked. ``connect`` (reverse mode) of the SDKs
that dial the gateway: a ``--url`` that can never reach one ends at once the same way,
rather than being retried for ever, and so does a gateway that closes the connection 4403
on the plugin's hello (the same hello would get the same close).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

from tests.conformance.conftest import LANGUAGES, WEBSOCKET_MODES, executable
from tests.conftest import ROOT
from tests.gateway_support import closing_gateway
from tests.services import CLEAN_ENVIRONMENT

#: Words that mean a runtime printed a crash instead of an answer.
CRASHES = ("Traceback", "Exception", "panic:", "\tat ", "    at ", "RangeError", "Error: ")

BAD_ADDRESSES = [
    pytest.param("", id="empty"),
    pytest.param("not-an-address", id="no port"),
    pytest.param("127.0.0.1:", id="empty port"),
    pytest.param("127.0.0.1:99999", id="port over 65535"),
    pytest.param("127.0.0.1:-1", id="negative port"),
    pytest.param("127.0.0.1:http", id="port by name"),
    pytest.param(":50051", id="no host"),
    pytest.param("::1:50051", id="IPv6 without brackets"),
]


BAD_URLS = [
    pytest.param("not-a-url", id="no scheme"),
    pytest.param("ftp://127.0.0.1/v1/plugins/connect", id="not WebSocket"),
    pytest.param("ws://", id="no host"),
    pytest.param("ws//127.0.0.1:8080/v1/plugins/connect", id="a colon short"),
]
DIALLING = sorted(language for language, modes in WEBSOCKET_MODES.items() if "inbound" in modes)
SERVING_WEBSOCKET = sorted(
    language for language, modes in WEBSOCKET_MODES.items() if "websocket" in modes
)


def serve(
    language: str, *arguments: str, command: str = "serve"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(executable(language)), command, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env=CLEAN_ENVIRONMENT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def one_clear_line(done: subprocess.CompletedProcess[str], status: int = 1) -> str:
    """The failure's message: ``status``, nothing on stdout (the handshake line's place),
    no crash; the last line of stderr (a JVM or a token warning may come before it)."""
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    assert not any(crash in done.stderr for crash in CRASHES), done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
@pytest.mark.parametrize("language", LANGUAGES)
def test_a_mistyped_address_is_refused_in_one_line(language: str, address: str) -> None:
    line = one_clear_line(serve(language, "--address", address))
    assert "--address" in line and "host:port" in line, line
    assert repr(address)[1:-1] in line, line


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_port_already_taken_is_refused_in_one_line(language: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        line = one_clear_line(serve(language, "--address", address))
    assert line.startswith(f"serve: cannot listen on {address}"), line


@pytest.mark.parametrize("language", LANGUAGES)
def test_run_by_hand_the_hint_comes_before_a_malformed_stop_cap(language: str) -> None:
    """Without the handshake cookie a plugin says how to run it by hand, even when a stop
    cap is malformed: every SDK checks the cookie first (Java and TypeScript refused the
    cap first until 2026-12-05, and the hint never showed)."""
    done = subprocess.run(
        [str(executable(language))],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **{k: v for k, v in CLEAN_ENVIRONMENT.items() if not k.startswith("LINCHKIT_PLUGIN_")},
            "LINCHKIT_PLUGIN_STOP_GRACE_MS": "soon",
        },
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    assert not any(crash in done.stderr for crash in CRASHES), done.stderr
    assert "serve --address" in done.stderr, done.stderr
    assert "LINCHKIT_PLUGIN_STOP_GRACE_MS" not in done.stderr, done.stderr


@pytest.mark.parametrize("language", LANGUAGES)
def test_help_shows_the_flags_and_the_environment(language: str) -> None:
    done = serve(language, "--help")
    assert done.returncode == 0, done.stderr
    assert "address" in done.stdout and "LINCHKIT_PLUGIN_TOKEN" in done.stdout, done.stdout
    # How long a stop waits, which an operator sets (tests/conformance/test_stop_drains_first.py).
    for variable in ("LINCHKIT_PLUGIN_STOP_GRACE_MS", "LINCHKIT_PLUGIN_STOP_HOOKS_MS"):
        assert variable in done.stdout, done.stdout
    assert not any(crash in done.stdout + done.stderr for crash in CRASHES)


@pytest.mark.parametrize("url", BAD_URLS)
@pytest.mark.parametrize("language", DIALLING)
def test_connect_refuses_a_url_that_can_never_reach_a_gateway(language: str, url: str) -> None:
    line = one_clear_line(serve(language, "--url", url, command="connect"))
    assert "--url" in line and "ws://" in line and url in line, line


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "", "::1:50051"])
@pytest.mark.parametrize("language", SERVING_WEBSOCKET)
def test_serve_websocket_holds_to_the_same_address_rule(language: str, address: str) -> None:
    line = one_clear_line(serve(language, "--websocket", "--address", address))
    assert "--address" in line and "host:port" in line, line
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        line = one_clear_line(serve(language, "--websocket", "--address", busy))
    assert line.startswith(f"serve: cannot listen on {busy}"), line


#: Every SDK's WebSocket modes refuse ``LINCHKIT_REGISTER_ETCD``: no dispatcher finds a
#: WebSocket plugin in a registry.
REFUSING_ETCD = [
    (language, mode) for language in LANGUAGES for mode in WEBSOCKET_MODES.get(language, ())
]


@pytest.mark.parametrize(("language", "mode"), REFUSING_ETCD)
def test_a_websocket_mode_refuses_to_register_in_etcd(language: str, mode: str) -> None:
    """Told to register, a WebSocket plugin ends before it listens or dials, in one line
    naming the variable: an operator who set it expects the plugin to be found there."""
    command, arguments = {
        "websocket": ("serve", ["--websocket", "--address", "127.0.0.1:0"]),
        "inbound": ("connect", ["--url", "ws://127.0.0.1:9/v1/plugins/connect"]),
    }[mode]
    done = subprocess.run(
        [str(executable(language)), command, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env={**CLEAN_ENVIRONMENT, "LINCHKIT_REGISTER_ETCD": "http://127.0.0.1:2379"},
        stdin=subprocess.DEVNULL,
        check=False,
    )
    line = one_clear_line(done)
    assert line.startswith(f"{command}: LINCHKIT_REGISTER_ETCD: "), line
    assert "not registered in etcd" in line, line


#: The Python SDK's ``dispatcher-plugin``, held to the example plugins' rule beside them.
DISPATCHER_PLUGIN = "dispatcher-plugin"


def command_line(executable_of: str, command: str) -> list[str]:
    """``command`` (``serve``, ``connect``) of a language's example plugin, or of
    ``dispatcher-plugin`` serving the echo example (as this checkout has it)."""
    if executable_of != DISPATCHER_PLUGIN:
        return [str(executable(executable_of)), command]
    return [
        *(sys.executable, "-m", "linchkit_plugin.cli", command, "echo_plugin:EchoPlugin"),
        *("--path", str(ROOT / "examples" / "python")),
    ]


def environment_with(variables: dict[str, str]) -> dict[str, str]:
    """``variables`` over the clean environment, with ``dispatcher-plugin`` importable."""
    python_path = [str(ROOT), str(ROOT / "sdk" / "python"), os.environ.get("PYTHONPATH", "")]
    return {**CLEAN_ENVIRONMENT, **variables, "PYTHONPATH": os.pathsep.join(python_path)}


ETCD = {"LINCHKIT_REGISTER_ETCD": "http://127.0.0.1:9", "LINCHKIT_REGISTER_PREFIX": "/p/example"}
#: (command, its arguments, the variables set, the one refused, the mode it needs) of each
#: refusal of a variable's value that every executable says the same way.
VARIABLE_REFUSALS = {
    "stop grace": (
        "serve",
        [],
        {"LINCHKIT_PLUGIN_STOP_GRACE_MS": "soon"},
        "LINCHKIT_PLUGIN_STOP_GRACE_MS",
        None,
    ),
    "registry ttl": (
        "serve",
        [],
        {**ETCD, "LINCHKIT_REGISTER_TTL": "often"},
        "LINCHKIT_REGISTER_TTL",
        None,
    ),
    "leave delay": (
        "serve",
        [],
        {**ETCD, "LINCHKIT_LEAVE_DELAY": "later"},
        "LINCHKIT_LEAVE_DELAY",
        None,
    ),
    "websocket told to register": (
        "serve",
        ["--websocket"],
        ETCD,
        "LINCHKIT_REGISTER_ETCD",
        "websocket",
    ),
    "connect told to register": ("connect", [], ETCD, "LINCHKIT_REGISTER_ETCD", "inbound"),
}
WHERE = {"serve": "127.0.0.1:0", "connect": "ws://127.0.0.1:9/v1/plugins/connect"}


def _variable_cases() -> list[object]:
    """Each refusal for ``dispatcher-plugin`` and every language, but in a mode (WebSocket,
    reverse) that a language's SDK does not have."""
    return [
        pytest.param(language, command, arguments, variables, refused, id=f"{language}-{name}")
        for name, (command, arguments, variables, refused, mode) in VARIABLE_REFUSALS.items()
        for language in [*LANGUAGES, DISPATCHER_PLUGIN]
        if mode is None
        or language == DISPATCHER_PLUGIN
        or mode in WEBSOCKET_MODES.get(language, ())
    ]


@pytest.mark.parametrize(
    ("language", "command", "arguments", "variables", "refused"), _variable_cases()
)
def test_a_variable_refused_is_said_after_the_command(
    language: str, command: str, arguments: list[str], variables: dict[str, str], refused: str
) -> None:
    """A variable whose value a command cannot take ends it in one line that begins with
    the command and the variable, ``serve: LINCHKIT_REGISTER_TTL …``, in every SDK's
    example plugin and in ``dispatcher-plugin``, which said ``Error: …`` until
    2026-12-06."""
    where = ["--port", "0"] if command == "serve" else ["--id", "example", "--version", "1"]
    if language != DISPATCHER_PLUGIN:
        where = ["--address" if command == "serve" else "--url", WHERE[command]]
    elif command == "connect":
        where += ["--url", WHERE[command]]
    done = subprocess.run(
        [*command_line(language, command), *arguments, *where],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment_with(variables),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    line = one_clear_line(done)
    assert line.startswith(f"{command}: {refused}"), line


#: What each WebSocket mode is given after its command, but --config.
MODE_ARGUMENTS = {
    "websocket": ("serve", ["--websocket", "--address", "127.0.0.1:0"]),
    "inbound": ("connect", ["--url", "ws://127.0.0.1:9/v1/plugins/connect"]),
}
DISPATCHER_PLUGIN_ARGUMENTS = {
    "websocket": ["--websocket", "--port", "0"],
    "inbound": ["--url", "ws://127.0.0.1:9/v1/plugins/connect", "--id", "e", "--version", "1"],
}
SECRET_CONFIG = '{"password": "s3cr3t-of-the-config"'


@pytest.mark.parametrize(
    ("config", "said"),
    [
        pytest.param(SECRET_CONFIG, "--config is not valid JSON", id="not json"),
        pytest.param('["a", "b"]', "--config must be a JSON object", id="an array"),
        pytest.param("null", "--config must be a JSON object", id="null"),
    ],
)
@pytest.mark.parametrize(
    ("language", "mode"),
    [
        *((language, mode) for language in LANGUAGES for mode in WEBSOCKET_MODES.get(language, ())),
        *((DISPATCHER_PLUGIN, mode) for mode in ("websocket", "inbound")),
    ],
)
def test_a_config_that_is_no_json_object_is_refused_by_name(
    language: str, mode: str, config: str, said: str
) -> None:
    """``--config`` is the JSON object for the init hook: one that is no JSON, or JSON but
    no object, ends the command in one line naming the flag, never its text (a config may
    hold a secret). Before 2026-12-06 TypeScript's line did not begin with the command
    and said "must be a JSON object" of text that was no JSON, Python's quoted its JSON
    parser and passed an array on to init (whose hooks then crashed), and Go's and Rust's
    served with an array or null."""
    command, arguments = MODE_ARGUMENTS[mode]
    if language == DISPATCHER_PLUGIN:
        arguments = DISPATCHER_PLUGIN_ARGUMENTS[mode]
    done = subprocess.run(
        [*command_line(language, command), *arguments, "--config", config],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment_with({}),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    line = one_clear_line(done)
    assert line == f"{command}: {said}", line
    assert "s3cr3t" not in done.stderr


@pytest.mark.parametrize("language", DIALLING)
async def test_connect_ends_when_the_gateway_closes_the_hello_4403(language: str) -> None:
    """The hello names another id or version than the gateway admitted at the upgrade: it
    closes the connection 4403. One line naming the gateway's reason and status 1, after
    one connection, as for a 403 at the upgrade: not dialled again for ever."""
    reason = "admitted as version 2.0.0, said '1.0.0'"
    async with closing_gateway(4403, reason) as (url, hellos):
        command = [str(executable(language)), "connect", "--url", url]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=CLEAN_ENVIRONMENT,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(process.communicate(), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    done = subprocess.CompletedProcess(command, process.returncode, out.decode(), err.decode())
    line = one_clear_line(done)
    assert line == f"connect: the gateway refused the connection (4403): {reason}", line
    assert len(hellos) == 1
