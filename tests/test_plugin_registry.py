"""Plugins register themselves in etcd (``linchkit_plugin.registry``): real plugin
processes, a real etcd (tests/services.py), signals sent as an orchestrator sends them.

Waits are generous (a busy 2-core machine); what is asserted is where the key is and what
it holds, never how fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from typing import Any

import pytest

from dispatcher.fleet.sources.etcd import EtcdSource
from linchkit_plugin import cli
from linchkit_plugin._registry_options import (
    add_registry_options,
    flags_given,
    registry_settings,
    websocket_refusal,
)
from providers.discovery import Endpoint, RegistryDiscovery
from tests.conftest import EXAMPLES, ROOT
from tests.sdk_toolchains import BIN
from tests.services import CLEAN_ENVIRONMENT, Etcd, free_port, until, wait_for

PLUGIN = [
    str(BIN / "dispatcher-plugin"),
    "serve",
    "echo_plugin:EchoPlugin",
    "--path",
    str(EXAMPLES),
]
PYTHON_GRPC_EXAMPLE = ROOT / "sdk" / "python" / "examples" / "example_plugin.py"
GO_EXAMPLE = ROOT / "sdk" / "go" / "dist" / "example-plugin"
JAVA_EXAMPLE = ROOT / "sdk" / "java" / "dist" / "example-plugin"
TYPESCRIPT_EXAMPLE = ROOT / "sdk" / "typescript" / "dist" / "example-plugin"
RUST_EXAMPLE = ROOT / "sdk" / "rust" / "dist" / "example-plugin"
#: The example plugins of the SDKs other than Python's, each built by its toolchain.
EXAMPLES_BY_LANGUAGE = {
    "go": GO_EXAMPLE,
    "rust": RUST_EXAMPLE,
    "typescript": TYPESCRIPT_EXAMPLE,
    "java": JAVA_EXAMPLE,
}
#: The SDKs other than Python's that register their gRPC service.
OTHER_SDKS = [
    pytest.param(language, marks=pytest.mark.toolchain) for language in EXAMPLES_BY_LANGUAGE
]


def example(language: str) -> str:
    """The example plugin of ``language``'s SDK (go, rust, typescript, java), failing when not built."""
    path = EXAMPLES_BY_LANGUAGE[language]
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `make sdks` (sdk/{language}/build.sh)")
    return str(path)


def only_key(etcd: Etcd, prefix: str) -> tuple[str, dict[str, Any]]:
    keys = wait_for(lambda: etcd.keys(prefix), what=f"a key under {prefix}")
    assert len(keys) == 1, keys
    [(key, value)] = keys.items()
    return key, json.loads(value)


def health(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as answer:
        return bool(answer.status == 200)


def test_serve_registers_its_real_address_and_leaves_on_sigterm(
    etcd: Etcd, etcd_prefix: str, plugins: Any
) -> None:
    plugin = plugins(
        [*PLUGIN, "--host", "127.0.0.2", "--port", "0"],
        LINCHKIT_REGISTER_ETCD=etcd.url,
        LINCHKIT_REGISTER_PREFIX=etcd_prefix,
    )
    said = plugin.wait_said("registered ")
    key, value = only_key(etcd, etcd_prefix)
    # --port 0: the port the kernel gave, as the server itself says it listens.
    assert f"listening on {value['url']} " in said
    assert value["url"].startswith("http://127.0.0.2:") and not value["url"].endswith(":0")
    assert health(value["url"])
    instance = key.removeprefix(f"{etcd_prefix}/")
    assert f"-{plugin.process.pid}-" in instance  # hostname-pid-random: readable, unique

    plugin.signal(signal.SIGTERM)
    assert etcd.keys(etcd_prefix) == {}, "the key is deleted before the process ends"
    assert f"deregistered {key}" in plugin.stderr


def test_a_killed_plugin_leaves_when_its_lease_ends(
    etcd: Etcd, etcd_prefix: str, plugins: Any
) -> None:
    plugin = plugins(
        [
            *PLUGIN,
            "--port",
            "0",
            "--register-etcd",
            etcd.url,
            "--register-prefix",
            etcd_prefix,
            "--register-ttl",
            "2",
        ],
    )
    plugin.wait_said("registered ")
    only_key(etcd, etcd_prefix)
    plugin.signal(signal.SIGKILL)
    wait_for(lambda: etcd.keys(etcd_prefix) == {}, what="the lease to end and take the key")


def test_flags_win_over_the_environment_and_advertise_is_written_as_given(
    etcd: Etcd, etcd_prefix: str, plugins: Any
) -> None:
    plugin = plugins(
        [
            *PLUGIN,
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--register-prefix",
            etcd_prefix,
            "--advertise",
            "https://echo-3.plugins.internal/fn/",
        ],
        LINCHKIT_REGISTER_ETCD=etcd.url,
        LINCHKIT_REGISTER_PREFIX="/somewhere/else",
    )
    plugin.wait_said("registered ")
    _, value = only_key(etcd, etcd_prefix)
    assert value == {"url": "https://echo-3.plugins.internal/fn"}
    plugin.signal(signal.SIGINT)
    assert etcd.keys(etcd_prefix) == {}


def test_an_unreachable_etcd_does_not_stop_the_plugin_which_registers_later(
    own_etcd: Etcd, plugins: Any
) -> None:
    own_etcd.stop()
    port = free_port("127.0.0.3")
    plugin = plugins(
        [
            *PLUGIN,
            "--host",
            "127.0.0.3",
            "--port",
            str(port),
            "--register-etcd",
            own_etcd.url,
            "--register-prefix",
            "/p",
            "--register-ttl",
            "3",
        ],
    )
    said = plugin.wait_said("cannot register")
    assert "serving anyway" in said and "Traceback" not in said
    assert health(f"http://127.0.0.3:{port}")

    own_etcd.start()
    plugin.wait_said("etcd answers again")
    assert only_key(own_etcd, "/p")[1] == {"url": f"http://127.0.0.3:{port}"}
    assert plugin.stderr.count("cannot register") == 1, "the outage is said once, not per retry"


def test_a_lease_lost_with_etcd_s_data_is_registered_again(own_etcd: Etcd, plugins: Any) -> None:
    plugin = plugins(
        [
            *PLUGIN,
            "--port",
            "0",
            "--register-etcd",
            own_etcd.url,
            "--register-prefix",
            "/p",
            "--register-ttl",
            "3",
        ],
    )
    plugin.wait_said("registered ")
    key, value = only_key(own_etcd, "/p")
    own_etcd.stop()
    shutil.rmtree(own_etcd.data_dir)  # a new, empty etcd on the same address
    own_etcd.start()
    plugin.wait_said("registering again")
    assert only_key(own_etcd, "/p") == (key, value)
    plugin.signal(signal.SIGTERM)
    assert own_etcd.keys("/p") == {}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--host", "0.0.0.0"], "which no dispatcher can call: say where it is reached"),
        (["--host", "::"], "--advertise"),
        (["--uds", "/tmp/never.sock"], "--advertise"),
        (["--advertise", "0.0.0.0:8081"], "not 0.0.0.0"),
        (["--advertise", "ftp://x:1"], "http(s)://host"),
        (["--advertise", "no-port"], "URL or host:port"),
        (["--register-prefix", "/ends/with/"], "not end with one"),
        (["--register-prefix", "no-slash"], "must start with /"),
        (["--register-ttl", "1"], "at least 2 seconds"),
        (["--leave-delay", "-1"], "--leave-delay is a number of seconds in [0, 600]"),
        (["--leave-delay", "nan"], "--leave-delay is a number of seconds in [0, 600]"),
        (["--register-etcd", "unix:///x"], "http(s):// URL"),
        (["--register-etcd", "http://user:SECRET@127.0.0.1:1"], "credentials"),
        (["--register-etcd", "http://etcd..internal:2379"], "valid host name"),
        (["--register-etcd", "http://127.0.0.1:99999"], "port in 1-65535"),
        (["--register-etcd", "http://127.0.0.1:0"], "port in 1-65535"),
    ],
)
def test_registration_mistakes_fail_before_serving(arguments: list[str], message: str) -> None:
    defaults = {"--register-etcd": "http://127.0.0.1:1", "--register-prefix": "/p"}
    for flag, value in defaults.items():
        if flag not in arguments:
            arguments = [*arguments, flag, value]
    # A port beside a Unix socket is a usage error of its own.
    port = [] if "--uds" in arguments else ["--port", "0"]
    done = subprocess.run(
        [*PLUGIN, *port, *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        env=CLEAN_ENVIRONMENT,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert "SECRET" not in done.stderr


def test_registry_flags_win_over_variables_and_mistakes_are_named_as_given() -> None:
    """One definition for every Python serve (``_registry_options``): a flag wins over its
    variable, an empty one too, and a message names the setting the way it came."""
    parser = argparse.ArgumentParser()
    add_registry_options(parser, kind="address")
    environment = {
        "LINCHKIT_REGISTER_ETCD": "https://10.9.9.9:2379",
        "LINCHKIT_REGISTER_PREFIX": "/from/env",
        "LINCHKIT_REGISTER_TTL": "ten",
    }

    def settings(*flags: str, **changes: str) -> Any:
        return registry_settings(
            parser.parse_args(flags),
            kind="address",
            host="127.0.0.2",
            environment={**environment, **changes},
        )

    assert settings("--register-etcd", "", "--register-ttl", "4") is None, "turned off"
    chosen = settings("--register-etcd", "http://127.0.0.1:2379", "--register-ttl", "4")
    assert (chosen.etcd, chosen.prefix, chosen.ttl) == ("http://127.0.0.1:2379", "/from/env", 4)
    assert chosen.registration("127.0.0.2", 50051).value == b'{"address":"127.0.0.2:50051"}'
    with pytest.raises(ValueError, match=r"^LINCHKIT_REGISTER_TTL must be a whole number"):
        settings()
    with pytest.raises(ValueError, match=r"^--register-ttl must be at least 2 seconds"):
        settings("--register-ttl", "1")
    with pytest.raises(
        ValueError, match=r"^--register-prefix: the registry prefix must start with /"
    ):
        settings("--register-prefix", "/ends/", "--register-ttl", "4")
    with pytest.raises(
        ValueError,
        match=r"^LINCHKIT_REGISTER_ETCD_PASSWORD needs --register-etcd-user"
        r" \(or LINCHKIT_REGISTER_ETCD_USER\) too",
    ):
        settings("--register-ttl", "4", LINCHKIT_REGISTER_ETCD_PASSWORD="SECRET")


def test_a_prefix_is_required() -> None:
    done = subprocess.run(
        [*PLUGIN, "--port", "0", "--register-etcd", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=CLEAN_ENVIRONMENT,
        check=False,
    )
    assert done.returncode == 1 and "needs --register-prefix" in done.stderr


@pytest.mark.parametrize(
    ("command", "environment", "named"),
    [
        # dispatcher-plugin's --register-etcd is a usage error, as its other registry flags:
        # tests/conformance/test_command_line_refusals_show_no_value.py.
        (
            [*PLUGIN, "--port", "0", "--websocket"],
            {"LINCHKIT_REGISTER_ETCD": "http://127.0.0.1:1"},
            "LINCHKIT_REGISTER_ETCD",
        ),
        (
            [sys.executable, str(PYTHON_GRPC_EXAMPLE), "serve", "--websocket"],
            {"LINCHKIT_REGISTER_ETCD": "http://127.0.0.1:1", "LINCHKIT_REGISTER_PREFIX": "/p"},
            "LINCHKIT_REGISTER_ETCD",
        ),
        pytest.param(
            [str(GO_EXAMPLE), "serve", "--websocket"],
            {"LINCHKIT_REGISTER_ETCD": "http://127.0.0.1:1", "LINCHKIT_REGISTER_PREFIX": "/p"},
            "LINCHKIT_REGISTER_ETCD",
            marks=pytest.mark.toolchain,
        ),
        pytest.param(
            [str(TYPESCRIPT_EXAMPLE), "serve", "--websocket"],
            {"LINCHKIT_REGISTER_ETCD": "http://127.0.0.1:1", "LINCHKIT_REGISTER_PREFIX": "/p"},
            "LINCHKIT_REGISTER_ETCD",
            marks=pytest.mark.toolchain,
        ),
        pytest.param(
            [str(TYPESCRIPT_EXAMPLE), "serve", "--websocket", "--register-etcd", "http://[::1]:1"],
            {"LINCHKIT_REGISTER_PREFIX": "/p"},
            "--register-etcd",
            marks=pytest.mark.toolchain,
        ),
    ],
    ids=[
        "dispatcher-plugin-variable",
        "executable-variable",
        "go-variable",
        "typescript-variable",
        "typescript-flag",
    ],
)
def test_a_websocket_server_told_to_register_says_it_cannot_and_does_not_start(
    command: list[str], environment: dict[str, str], named: str
) -> None:
    """A dispatcher dials a websocket target at its one url and finds none in a registry:
    a WebSocket server told to register would be found by nobody, so it refuses rather
    than let the operator believe it registered."""
    if not os.access(command[0], os.X_OK):
        pytest.fail(f"{command[0]} is missing: run `make sdks`")
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={**CLEAN_ENVIRONMENT, **environment},
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert f"{named}: a WebSocket server is not registered in etcd" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_websocket_server_is_given_the_registry_flags_it_must_refuse() -> None:
    """Not only --register-etcd: any registry flag tells a WebSocket server something it
    will not do, and was dropped before. ``flags_given`` names those its command line gave
    a value, --register-etcd among them (``dispatcher-plugin serve --websocket`` refuses
    them as a usage error: tests/conformance/test_command_line_refusals_show_no_value.py;
    until 2026-12-06 --register-etcd was ``websocket_refusal``'s, status 1); an empty flag
    says "none" (over a variable) and stays allowed. ``LINCHKIT_REGISTER_ETCD`` is
    ``websocket_refusal``'s: the other flags alone do not make it one told to register."""
    serve = cli._parsers()[1]
    variable = {"LINCHKIT_REGISTER_ETCD": "http://127.0.0.1:1"}
    for flags, named in [
        (["--register-prefix", "/p"], ["--register-prefix"]),
        (
            ["--register-etcd=", "--advertise", "h:1", "--register-ttl", "4"],
            ["--advertise", "--register-ttl"],
        ),
        (
            ["--leave-delay=2", "--register-etcd", "http://127.0.0.1:1"],
            ["--register-etcd", "--leave-delay"],
        ),
        (["--register-etcd=", "--advertise="], []),
    ]:
        options = serve.parse_args(["module:Class", *flags])
        assert flags_given(options, options.given) == named, flags
    assert (
        websocket_refusal(serve.parse_args(["module:Class", "--register-etcd="]), variable) is None
    )
    options = serve.parse_args(["module:Class", "--register-prefix", "/p"])
    assert websocket_refusal(options, {}) is None
    refusal = websocket_refusal(options, variable)
    assert refusal is not None and refusal.startswith("LINCHKIT_REGISTER_ETCD: a WebSocket")


@pytest.mark.parametrize("delay", ["-1", "nan", "601", "soon"])
@pytest.mark.parametrize("language", ["python", *OTHER_SDKS])
def test_the_grpc_services_refuse_a_bad_leave_delay_before_serving(
    language: str, delay: str
) -> None:
    command = (
        [sys.executable, str(PYTHON_GRPC_EXAMPLE)] if language == "python" else [example(language)]
    )
    done = subprocess.run(
        [*command, "serve", "--address", "127.0.0.2:0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **CLEAN_ENVIRONMENT,
            "LINCHKIT_REGISTER_ETCD": "http://127.0.0.1:1",
            "LINCHKIT_REGISTER_PREFIX": "/p",
            "LINCHKIT_LEAVE_DELAY": delay,
        },
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "LINCHKIT_LEAVE_DELAY" in done.stderr and "[0, 600]" in done.stderr
    assert "Traceback" not in done.stderr and "panic" not in done.stderr


REGISTRY_FLAGS = (
    "--register-etcd",
    "--register-prefix",
    "--advertise",
    "--register-ttl",
    "--leave-delay",
    "--register-etcd-ca-file",
    "--register-etcd-cert-file",
    "--register-etcd-key-file",
    "--register-etcd-user",
)


@pytest.mark.parametrize(
    "command",
    [
        [*PLUGIN[:2], "--help"],
        [sys.executable, str(PYTHON_GRPC_EXAMPLE), "serve", "--help"],
        pytest.param([str(TYPESCRIPT_EXAMPLE), "serve", "--help"], marks=pytest.mark.toolchain),
    ],
    ids=["dispatcher-plugin", "grpc-service", "typescript"],
)
def test_every_serve_s_help_names_the_registry_flags_and_their_variables(
    command: list[str],
) -> None:
    """Go's flag package writes its flags with one dash: its help is Go's own test's."""
    if not os.access(command[0], os.X_OK):
        pytest.fail(f"{command[0]} is missing: run `make sdks`")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=CLEAN_ENVIRONMENT, check=True
    )
    for flag in REGISTRY_FLAGS:
        assert f"{flag} " in done.stdout, flag
    for suffix in ("ETCD", "PREFIX", "TTL", "ETCD_CA_FILE", "ETCD_USER", "ETCD_PASSWORD"):
        assert f"LINCHKIT_REGISTER_{suffix}" in done.stdout
    for suffix in ("ADVERTISE", "LEAVE_DELAY", "PLUGIN_TOKEN_FILE"):
        assert f"LINCHKIT_{suffix}" in done.stdout
    assert "--register-etcd-password" not in done.stdout, "there only to be refused"


@pytest.mark.parametrize("language", OTHER_SDKS)
def test_the_sdks_serve_help_names_the_registry_flags_and_their_variables(language: str) -> None:
    done = subprocess.run(
        [example(language), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=CLEAN_ENVIRONMENT,
        check=True,
    )
    for flag in REGISTRY_FLAGS:  # Go's flag package shows one dash
        assert f"{flag.lstrip('-')} " in done.stdout, flag
    for suffix in ("ETCD", "PREFIX", "TTL", "ETCD_CA_FILE", "ETCD_USER", "ETCD_PASSWORD"):
        assert f"LINCHKIT_REGISTER_{suffix}" in done.stdout
    for suffix in ("ADVERTISE", "LEAVE_DELAY", "PLUGIN_TOKEN_FILE"):
        assert f"LINCHKIT_{suffix}" in done.stdout
    assert "register-etcd-password" not in done.stdout, "there only to be refused"


def test_the_python_grpc_service_registers_its_address(
    etcd: Etcd, etcd_prefix: str, plugins: Any
) -> None:
    plugin = plugins(
        [sys.executable, str(PYTHON_GRPC_EXAMPLE), "serve", "--address", "127.0.0.2:0"],
        LINCHKIT_REGISTER_ETCD=etcd.url,
        LINCHKIT_REGISTER_PREFIX=etcd_prefix,
        LINCHKIT_REGISTER_TTL="4",
    )
    plugin.wait_said("registered ")
    _, value = only_key(etcd, etcd_prefix)
    assert value["address"].startswith("127.0.0.2:") and value["address"] != "127.0.0.2:0"
    assert plugin.signal(signal.SIGTERM) == 0
    assert etcd.keys(etcd_prefix) == {}


@pytest.mark.parametrize("language", OTHER_SDKS)
def test_the_sdk_example_plugins_register_and_leave_on_sigterm(
    etcd: Etcd, etcd_prefix: str, plugins: Any, language: str
) -> None:
    plugin = plugins(
        [example(language), "serve", "--address", "127.0.0.3:0"],
        LINCHKIT_REGISTER_ETCD=etcd.url,
        LINCHKIT_REGISTER_PREFIX=etcd_prefix,
        LINCHKIT_REGISTER_TTL="4",
    )
    plugin.wait_said("registered ")
    key, value = only_key(etcd, etcd_prefix)
    assert set(value) == {"address"}
    assert value["address"].startswith("127.0.0.3:") and value["address"] != "127.0.0.3:0"
    assert f"-{plugin.process.pid}-" in key
    assert plugin.signal(signal.SIGTERM) == 0
    assert etcd.keys(etcd_prefix) == {}
    assert f"deregistered {key}" in plugin.stderr


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0"])
@pytest.mark.parametrize("language", OTHER_SDKS)
def test_the_sdk_example_plugins_refuse_to_advertise_every_interface(
    language: str, address: str
) -> None:
    done = subprocess.run(
        [example(language), "serve", "--address", address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={
            **CLEAN_ENVIRONMENT,
            "LINCHKIT_REGISTER_ETCD": "http://127.0.0.1:1",
            "LINCHKIT_REGISTER_PREFIX": "/p",
        },
    )
    assert done.returncode == 1 and "LINCHKIT_ADVERTISE" in done.stderr, done.stderr
    assert "which no dispatcher can call" in done.stderr and done.stdout == ""


async def test_a_fleet_source_follows_plugins_that_come_and_go(
    etcd: Etcd, etcd_prefix: str, plugins: Any
) -> None:
    """Both halves of the contract together: what the SDK writes is what the source reads."""
    reported: list[list[Endpoint]] = []
    source = EtcdSource(RegistryDiscovery.model_validate({"etcd": etcd.url, "prefix": etcd_prefix}))
    task = asyncio.create_task(source.run(lambda found: reported.append(list(found))))
    try:
        ports = {host: free_port(host) for host in ("127.0.0.2", "127.0.0.3")}
        started = {
            host: plugins(
                [*PLUGIN, "--host", host, "--port", str(port)],
                LINCHKIT_REGISTER_ETCD=etcd.url,
                LINCHKIT_REGISTER_PREFIX=etcd_prefix,
            )
            for host, port in ports.items()
        }
        both = {Endpoint(host, port) for host, port in ports.items()}
        await until(lambda: reported and set(reported[-1]) == both, "both plugins")
        await asyncio.to_thread(started["127.0.0.2"].signal, signal.SIGTERM)
        one = {Endpoint("127.0.0.3", ports["127.0.0.3"])}
        await until(lambda: set(reported[-1]) == one, "only the plugin left")
        assert source.error is None and source.skipped == {}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await source.aclose()


@pytest.mark.parametrize(
    "command",
    [
        [
            str(BIN / "dispatcher-plugin"),
            *("connect", "echo_plugin:EchoPlugin", "--path", str(EXAMPLES)),
            *("--url", "ws://127.0.0.1:1/", "--id", "example", "--version", "1.0.0"),
        ],
        [sys.executable, str(PYTHON_GRPC_EXAMPLE), "connect", "--url", "ws://127.0.0.1:1/"],
        [str(GO_EXAMPLE), "connect", "--url", "ws://127.0.0.1:1/"],
        [str(TYPESCRIPT_EXAMPLE), "connect", "--url", "ws://127.0.0.1:1/"],
        [str(RUST_EXAMPLE), "connect", "--url", "ws://127.0.0.1:1/"],
    ],
    ids=["dispatcher-plugin", "executable", "go", "typescript", "rust"],
)
def test_a_plugin_that_dials_the_gateway_told_to_register_says_it_cannot(
    command: list[str],
) -> None:
    """A plugin that dials the gateway (connect) is known by its connection and dialled by
    no dispatcher: told to register, it was silently not registered; it refuses now, in
    one line, before it dials, in every SDK that dials (the Go and TypeScript SDKs test
    that no connection reaches the gateway)."""
    if not os.access(command[0], os.X_OK):
        pytest.fail(f"{command[0]} is missing: run `make sdks`")
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={**CLEAN_ENVIRONMENT, "LINCHKIT_REGISTER_ETCD": "http://127.0.0.1:1"},
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "LINCHKIT_REGISTER_ETCD: a plugin that dials the gateway (connect) is not" in (
        done.stderr
    ), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
