"""How long the Python SDK's stop waits, as an operator sets it (``linchkit_plugin.stopping``).

``LINCHKIT_PLUGIN_STOP_GRACE_MS`` (the calls in flight) and ``LINCHKIT_PLUGIN_STOP_HOOKS_MS``
(the ``stop`` and ``destroy`` hooks together): whole milliseconds from 0 to 10 minutes, 5 s
each unless set, read once at start by every executable and serve mode; a malformed value
ends the command at start in one line naming the variable, exit 1, never a traceback nor a
silent default. Before, both caps were fixed: a plugin whose stop hook flushes a large
buffer could not have more than 5 s, nor a platform that kills 3 s after SIGTERM less.

The stops themselves, with a configured cap, over every binding:
tests/test_python_plugin_stop_hooks.py, tests/test_python_plugin_http_stop.py and
tests/conformance/test_stop_drains_first.py (which runs the executables' refusal too).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from linchkit_plugin import cli
from linchkit_plugin._grpc_cli import read_command_line
from linchkit_plugin._uvicorn import server_config
from linchkit_plugin.asgi import PluginApp
from linchkit_plugin.host import PluginHost
from linchkit_plugin.limits import ServerLimits
from linchkit_plugin.stopping import STOP_GRACE_ENV, STOP_HOOKS_ENV, StopCaps
from linchkit_plugin.ws_server import main as websocket_main

MALFORMED = ["5s", "-1", "1.5", "+5", " 5", "5 ", "1e3", "5_000", "600001", "9" * 5000, "five", "٣"]


def test_the_caps_come_from_the_environment_in_whole_milliseconds() -> None:
    assert StopCaps.from_environment({}) == StopCaps(grace=5.0, hooks=5.0)
    assert StopCaps.from_environment({STOP_GRACE_ENV: "", STOP_HOOKS_ENV: ""}) == StopCaps()
    assert StopCaps.from_environment({STOP_GRACE_ENV: "1000"}) == StopCaps(grace=1.0)
    assert StopCaps.from_environment({STOP_HOOKS_ENV: "250"}) == StopCaps(hooks=0.25)
    assert StopCaps.from_environment({STOP_GRACE_ENV: "0", STOP_HOOKS_ENV: "0"}) == StopCaps(
        grace=0, hooks=0
    )
    assert StopCaps.from_environment(
        {STOP_GRACE_ENV: "600000", STOP_HOOKS_ENV: "0001500"}
    ) == StopCaps(grace=600.0, hooks=1.5)


@pytest.mark.parametrize("name", [STOP_GRACE_ENV, STOP_HOOKS_ENV])
@pytest.mark.parametrize("value", MALFORMED, ids=lambda value: repr(value[:12]))
def test_a_malformed_cap_is_refused_in_one_line_naming_its_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match="whole number of milliseconds") as refused:
        StopCaps.from_environment({name: value})
    message = str(refused.value)
    assert message.startswith(
        f"{name} must be a whole number of milliseconds from 0 to 600000 (10 minutes), not "
    ), message
    assert repr(value[:40]) in message and len(message) < 200 and "\n" not in message


@pytest.mark.parametrize("seconds", [-0.001, 600.001, float("nan"), float("inf")])
def test_caps_set_in_code_hold_to_the_same_range(seconds: float) -> None:
    with pytest.raises(ValueError, match="number of seconds from 0 to 600"):
        StopCaps(hooks=seconds)


def _refused(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    return line


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "example_plugin:ExamplePlugin", "--port", "0"],
        ["serve", "example_plugin:ExamplePlugin", "--port", "0", "--websocket"],
        *(
            [
                *("connect", "example_plugin:ExamplePlugin", "--url", "ws://127.0.0.1:9/"),
                *("--id", "example", "--version", "1.0.0"),
            ],
        ),
    ],
    ids=["http", "websocket", "connect"],
)
def test_dispatcher_plugin_refuses_a_malformed_cap_at_start(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(STOP_HOOKS_ENV, "5s")
    with pytest.raises(SystemExit) as ended:
        cli.main(argv)
    assert ended.value.code == 1
    assert _refused(capsys) == (
        f"{argv[0]}: {STOP_HOOKS_ENV} must be a whole number of milliseconds from 0 to 600000"
        " (10 minutes), not '5s'"
    )


def test_the_grpc_executable_refuses_a_malformed_cap_in_either_mode(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(STOP_GRACE_ENV, "1.5")
    assert read_command_line(["serve", "--address", "127.0.0.1:0"]) is None
    assert _refused(capsys).startswith(f"serve: {STOP_GRACE_ENV} must be a whole number")
    monkeypatch.setenv("LINCHKIT_PLUGIN_MAGIC_COOKIE", "d1spatch3r-pl4g1n")
    assert read_command_line([]) is None
    assert _refused(capsys).startswith(f"{STOP_GRACE_ENV} must be a whole number")
    monkeypatch.setenv(STOP_GRACE_ENV, "1500")
    launch = read_command_line([])
    assert launch is not None and launch.stop_caps == StopCaps(grace=1.5)


class _Plain:
    async def echo(self, value: Any = None) -> Any:
        return value


@pytest.mark.parametrize(
    "argv",
    [["serve", "--websocket"], ["connect", "--url", "ws://127.0.0.1:9/"]],
    ids=["serve", "connect"],
)
def test_the_websocket_modes_of_the_executable_refuse_a_malformed_cap(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(STOP_HOOKS_ENV, "-1")
    assert websocket_main(_Plain, argv, plugin_id="p", version="1") == 1
    assert _refused(capsys).startswith(f"{argv[0]}: {STOP_HOOKS_ENV} must be a whole number")


def test_the_http_server_gives_the_calls_in_flight_the_configured_grace() -> None:
    app = PluginApp(PluginHost(_Plain()), stop_caps=StopCaps(grace=1.5, hooks=0.5))
    assert server_config(app, ServerLimits(), stop_grace=1.5).timeout_graceful_shutdown == 1.5
    assert server_config(app, ServerLimits()).timeout_graceful_shutdown == 5.0


class _SwallowsCancellation:
    async def stop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()


async def test_hooks_of_0_are_not_waited_for_and_their_clean_up_follows_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before, a cancelled hook had 0.5 s to end whatever the cap (ABANDONED_HOOK_SECONDS),
    # then 0.5 s more once closed: a cap of 0 still held the stop a second.
    started = time.monotonic()
    assert await PluginHost(_SwallowsCancellation()).close_within(0) is False
    assert time.monotonic() - started < 0.4
    assert "stop hook did not finish within 0 s of the stop" in caplog.text


async def test_the_grpc_servers_quiet_wait_stays_within_a_shorter_grace() -> None:
    # A stopping gRPC server refuses calls as not run until none has arrived for 0.1 s,
    # at most 2 s (linchkit_plugin._grpc_drain), counted in the grace. Before, under calls
    # that kept coming it waited those 2 s whatever the grace: a grace set to 0.3 s let
    # the stop drain 2 s.
    from linchkit_plugin.grpc_server import PluginServer

    server = PluginServer(
        PluginHost(_Plain()), plugin_id="p", version="1", stop_caps=StopCaps(grace=0.3)
    )

    async def keep_calling() -> None:
        while True:
            server._gate.arrive()
            await asyncio.sleep(0.02)

    calling = asyncio.create_task(keep_calling())
    try:
        started = time.monotonic()
        await server._wind_down()
        assert time.monotonic() - started < 1.0
    finally:
        calling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await calling
