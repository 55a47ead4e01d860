"""provider: subprocess with real child processes: handshake, AutoMTLS, supervision, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from dispatcher import Dispatcher, DispatchError, ProviderError, TargetUnavailable
from linchkit_plugin._automtls import generate_certificate
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from providers.subprocess import HandshakeError, PluginProcess, SubprocessProvider
from tests.conftest import ROOT, manifest

PLUGINS = ROOT / "tests" / "plugins"
CRASHING = [sys.executable, str(PLUGINS / "crashing_plugin.py")]
# This checkout's host and SDK, not whichever the virtualenv installed (a worktree's differ).
SOURCE_PATH = os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python")])


def crashing(**target: Any) -> dict[str, Any]:
    # The child inherits almost nothing of our environment: it is told where this
    # checkout's SDK is.
    target = {**target, "env": {"PYTHONPATH": SOURCE_PATH, **target.get("env", {})}}
    return {
        "id": "crashing",
        "version": "1.0.0",
        "target": {"provider": "subprocess", "command": CRASHING, **target},
        "methods": {
            **{name: {} for name in ("pid", "echo", "announce", "nap", "environment")},
            **{name: {} for name in ("complain", "write", "exit", "unavailable", "spawn")},
            "flood": {"timeout_ms": 60_000},
        },
    }


def the_process(dispatcher: Dispatcher) -> PluginProcess:
    provider = dispatcher.providers["subprocess"]
    assert isinstance(provider, SubprocessProvider)
    (process,) = provider._processes.values()
    return process


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def plugin_children() -> list[int]:
    """Live processes of the crashing plugin started by this (the test's) process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if stat[0] != "Z" and int(stat[1]) == os.getpid() and b"crashing_plugin.py" in cmdline:
            found.append(int(entry.name))
    return found


async def eventually(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)


async def test_launch_logs_stderr_and_stop_leaves_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dispatcher.plugin.crashing")
    async with Dispatcher(manifest(crashing())) as dispatcher:
        process = the_process(dispatcher)
        pid = await dispatcher.call("crashing", "pid")
        assert pid == process.pid
        child = process._child
        assert child is not None
        assert child.connection is not None
        assert child.connection.address.startswith("unix:")  # the default network
        assert child.connection.security.tls  # AutoMTLS by default
        folder = child.folder
        await eventually(lambda: f"crashing plugin {pid} started" in caplog.text)
    assert not alive(pid)
    assert not Path(folder).exists()  # noqa: ASYNC240 - a test's one stat
    assert process.state == "stopped"
    assert process.exit_code == 0  # it left by itself, before any signal


async def test_a_flood_of_output_is_counted_not_logged_and_the_next_line_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before, every line was read, kept and logged on the event loop: with a plugin
    # writing in a loop the loop answered 270 ms late at the median (0.9 s at worst).
    caplog.set_level(logging.INFO, logger="dispatcher.plugin.crashing")
    flood = 50_000
    async with Dispatcher(manifest(crashing(max_log_lines_per_second=100))) as dispatcher:
        assert await dispatcher.call("crashing", "flood", {"lines": flood}) == flood
        await asyncio.sleep(0.1)  # the flood's end: a line fits again
        assert await dispatcher.call("crashing", "write", {"line": "after the flood"})
        await eventually(lambda: "after the flood" in caplog.text)
    logged = [r for r in caplog.records if r.getMessage().startswith("flood line ")]
    said = [
        r
        for r in caplog.records
        if "not logged, over its max_log_lines_per_second" in r.getMessage()
    ]
    assert said and all(r.levelno == logging.WARNING for r in said)
    not_logged = sum(int(r.getMessage().split(": ")[1].split()[0]) for r in said)
    assert len(logged) + not_logged == flood  # every line counted, none twice
    assert len(logged) < 2_000  # bursts of 100, 100 a second at most
    assert "(pid " in said[0].getMessage() and "crashing@1.0.0" in said[0].getMessage()


async def test_a_plugin_s_output_is_logged_and_kept_escaped_tabs_as_they_are(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before, the line reached the log, error messages and ``dispatcher logs`` as written:
    # an escape sequence set the operator's clipboard (OSC 52) or cleared the screen.
    caplog.set_level(logging.INFO, logger="dispatcher.plugin.crashing")
    written = "\x1b]52;c;cm0gLXJmIH4=\x07 done\x1b[2J\r\tat Plugin.run(Plugin.java:7)"
    shown = "\\x1b]52;c;cm0gLXJmIH4=\\x07 done\\x1b[2J\\r\tat Plugin.run(Plugin.java:7)"
    async with Dispatcher(manifest(crashing())) as dispatcher:
        assert await dispatcher.call("crashing", "write", {"line": written})
        await eventually(lambda: "Plugin.run" in caplog.text)
        spec = dispatcher.manifest.plugins[0]
        provider = dispatcher.providers["subprocess"]
        kept = [line async for line in provider.logs(spec, spec.target, follow=False, lines=5)]
    (record,) = [r for r in caplog.records if "Plugin.run" in r.getMessage()]
    assert record.getMessage() == shown
    assert shown in kept
    assert "\x1b" not in caplog.text


async def test_stderr_lines_keep_the_level_the_plugin_logged_them_at(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A host logging at WARNING sees the plugin's warnings and errors, whatever SDK wrote
    them; a line without a level stays INFO (docs/grpc-and-subprocess.md)."""
    caplog.set_level(logging.DEBUG, logger="dispatcher.plugin.crashing")
    lines = {
        "ERROR svc: the ledger is gone": logging.ERROR,
        '{"time":"2026-12-04T00:10:00Z","level":"WARN","msg":"slog json"}': logging.WARNING,
        'time=2026-12-04T00:10:00Z level=error msg="slog text"': logging.ERROR,
        "2026/12/04 00:10:00 WARN go log": logging.WARNING,
        "2026-12-04T00:10:00.123456Z  WARN plugin: rust tracing": logging.WARNING,
        "[0.012s][warning][gc] a JVM's -Xlog warning": logging.WARNING,
        "[2026-12-04T00:10:00.123+0000][0.5s][4242][error][os,thread] a JVM's -Xlog error": (
            logging.ERROR
        ),
        "[0.5s][info][gc] a JVM's -Xlog info": logging.INFO,
        "OpenJDK 64-Bit Server VM warning: the JVM's own warning": logging.WARNING,
        "Error reading a file, said as a sentence": logging.INFO,
    }
    async with Dispatcher(manifest(crashing())) as dispatcher:
        assert await dispatcher.call("crashing", "complain", {"text": "disk almost full"})
        for line in lines:
            assert await dispatcher.call("crashing", "write", {"line": line})
        await eventually(lambda: "said as a sentence" in caplog.text)

    def level_of(text: str) -> int:
        (record,) = [r for r in caplog.records if text in r.getMessage()]
        assert record.name == "dispatcher.plugin.crashing"
        return record.levelno

    assert level_of("disk almost full") == logging.WARNING  # the Python SDK's own format
    assert {line: level_of(line) for line in lines} == lines


async def test_a_crashed_plugin_is_restarted_as_a_new_process() -> None:
    target = {"restart_backoff_ms": 20}
    async with Dispatcher(manifest(crashing(**target))) as dispatcher:
        process = the_process(dispatcher)
        first = await dispatcher.call("crashing", "pid")
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: process.restarts == 1 and process.state == "running")
        second = await dispatcher.call("crashing", "pid", timeout=10)
        assert second != first
        assert not alive(first)
        # The new process's events reach the same handlers: Events reopened on the new channel.
        events: asyncio.Queue[Any] = asyncio.Queue()
        dispatcher.on("crashing", "hello", lambda _event, data: events.put_nowait(data))
        assert await dispatcher.call("crashing", "announce", {"name": "hello"}) is True
        assert await asyncio.wait_for(events.get(), 10) == second
        (report,) = await dispatcher.health()
        assert report.health.status == "serving"
        assert report.health.extra["restarts"] == 1


def pipes_held() -> int:
    """How many pipes this process holds open."""
    count = 0
    for descriptor in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, gone by now
            count += os.readlink(f"/proc/self/fd/{descriptor}").startswith("pipe:")
    return count


def kill_if_alive(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def test_a_crashed_plugin_s_helper_is_ended_and_the_plugin_restarted() -> None:
    # The helper, in the plugin's process group, holds the plugin's stdout and stderr.
    # Before, the crashed plugin was never restarted (asyncio's ``process.wait()`` waits
    # for every pipe to end) and the helper lived on; each restart would leave another.
    async with Dispatcher(manifest(crashing(restart_backoff_ms=20))) as dispatcher:
        process = the_process(dispatcher)
        first = await dispatcher.call("crashing", "pid")
        pipes = pipes_held()
        helper = await dispatcher.call("crashing", "spawn")
        try:
            os.kill(first, signal.SIGKILL)
            await eventually(lambda: process.restarts == 1 and process.state == "running")
            await eventually(lambda: not alive(helper), timeout=5)
            assert await dispatcher.call("crashing", "pid", timeout=10) != first
            assert pipes_held() == pipes  # the first launch's closed, the second's open
        finally:
            kill_if_alive(helper)


async def test_stopping_a_plugin_ends_what_it_left_in_its_process_group() -> None:
    # Before, the stop waited out the whole grace for the helper's pipes, and the helper
    # outlived it.
    dispatcher = Dispatcher(manifest(crashing(stop_grace_ms=8000)))
    await dispatcher.start()
    helper = await dispatcher.call("crashing", "spawn")
    try:
        started = time.monotonic()
        await dispatcher.aclose()
        assert time.monotonic() - started < 6
        await eventually(lambda: not alive(helper), timeout=5)
    finally:
        kill_if_alive(helper)


async def test_a_helper_that_left_the_plugin_s_session_holds_no_restart_back() -> None:
    # ``setsid``: out of the plugin's process group, not ended with it, and still holding
    # the plugin's stdout and stderr. Its pipes are closed a second after the exit.
    async with Dispatcher(manifest(crashing(restart_backoff_ms=20))) as dispatcher:
        process = the_process(dispatcher)
        first = await dispatcher.call("crashing", "pid")
        helper = await dispatcher.call("crashing", "spawn", {"own_session": True})
        try:
            pipes = pipes_held()
            os.kill(first, signal.SIGKILL)
            await eventually(lambda: process.restarts == 1 and process.state == "running")
            assert await dispatcher.call("crashing", "pid", timeout=10) != first
            assert alive(helper)  # documented: a process that left the group is not ours
            assert pipes_held() == pipes
        finally:
            kill_if_alive(helper)


def descriptors_into(folder: str) -> list[str]:
    """What this process holds open in ``folder`` (a pinned socket and its folder)."""
    found = []
    for descriptor in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, gone by now
            target = os.readlink(f"/proc/self/fd/{descriptor}")
            if target == folder or target.startswith(folder + os.sep):
                found.append(target)
    return found


async def test_the_socket_is_dialled_pinned_and_let_go_when_its_process_ends() -> None:
    # The host dials the socket it checked at the handshake, through a descriptor, at every
    # reconnect (tests/test_subprocess_sandbox.py: a plugin that swaps it for a symlink);
    # the descriptor goes with the process, at a restart as at the stop.
    async with Dispatcher(manifest(crashing(restart_backoff_ms=20))) as dispatcher:
        process = the_process(dispatcher)
        first = process._child
        assert first is not None and first.connection is not None
        assert first.connection.address.startswith("unix:/proc/self/fd/")
        assert len(descriptors_into(first.folder)) == 2  # the folder, the socket
        os.kill(await dispatcher.call("crashing", "pid"), signal.SIGKILL)
        await eventually(lambda: process.restarts == 1 and process.state == "running")
        assert not descriptors_into(first.folder)
        second = process._child
        assert second is not None
        assert await dispatcher.call("crashing", "echo", {"value": 1}) == 1
    assert not descriptors_into(second.folder)


async def test_a_crash_loop_stops_restarting_and_fails_calls() -> None:
    target = {
        "env": {"CRASH_AFTER_MS": "150"},
        "max_restarts": 2,
        "restart_backoff_ms": 10,
        "restart_window_s": 60,
    }
    async with Dispatcher(manifest(crashing(**target))) as dispatcher:
        process = the_process(dispatcher)
        await eventually(lambda: process.state == "failed", timeout=30)
        assert process.restarts == 2
        with pytest.raises(TargetUnavailable, match="failed") as caught:
            await dispatcher.call("crashing", "pid", timeout=2)
        assert caught.value.retryable is False
        (report,) = await dispatcher.health()
        assert report.health.status == "not_serving"


async def test_calls_during_a_restart_wait_for_the_new_process() -> None:
    async with Dispatcher(manifest(crashing(restart_backoff_ms=300))) as dispatcher:
        process = the_process(dispatcher)
        first = await dispatcher.call("crashing", "pid")
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: process.state == "restarting")
        second = await dispatcher.call("crashing", "pid", timeout=20)
        assert second not in (first, None)


async def test_a_call_made_once_a_crash_was_reported_waits_for_the_next_process() -> None:
    """A caller told that its call died with the plugin calls again at once. The plugin's
    socket closes a few ms before its exit is seen, and such a call went into the dead
    connection ("Stream removed (sendmsg: Broken pipe)", or cut off as "in flight"):
    about 1 in 20 failed. Each now waits for the next process, as during a restart."""
    target = {"restart_backoff_ms": 1, "restart_backoff_max_ms": 1, "max_restarts": 1000}
    async with Dispatcher(manifest(crashing(**target))) as dispatcher:
        for _ in range(50):
            with pytest.raises(TargetUnavailable):
                await dispatcher.call("crashing", "exit")
            assert isinstance(await dispatcher.call("crashing", "pid", timeout=20), int)
        assert the_process(dispatcher).restarts == 50


async def test_a_plugin_s_own_unavailable_answer_holds_no_call_back() -> None:
    """Only a connection closed under a call holds the next calls until the process is
    seen exiting: a plugin answering TargetUnavailable of its own still runs, and the
    next call, with less time than the stop grace, goes to it at once."""
    async with Dispatcher(manifest(crashing(stop_grace_ms=30_000))) as dispatcher:
        first = await dispatcher.call("crashing", "pid")
        with pytest.raises(TargetUnavailable, match="database is down"):
            await dispatcher.call("crashing", "unavailable")
        assert await dispatcher.call("crashing", "pid", timeout=5) == first


async def test_calls_while_a_plugin_stops_by_itself_go_to_the_next_process() -> None:
    """A plugin told to stop by someone else (a SIGTERM not the dispatcher's) answers
    calls "not run" and closes its socket before it exits: each of those calls, never
    sent to a process that would run it, waits for the next process as calls made during
    a restart do (26 of 60 failed before)."""
    async with Dispatcher(manifest(crashing(restart_backoff_ms=20))) as dispatcher:
        first = await dispatcher.call("crashing", "pid")
        os.kill(first, signal.SIGTERM)

        async def call_after(delay: float) -> Any:
            await asyncio.sleep(delay)
            return await dispatcher.call("crashing", "pid", timeout=20)

        pids = await asyncio.gather(*(call_after(i * 0.01) for i in range(60)))
        assert first not in pids
        assert not alive(first)
        assert the_process(dispatcher).restarts == 1


async def test_an_unresponsive_plugin_is_killed_by_health_pings_and_restarted() -> None:
    target = {"health_interval_ms": 200, "health_failures": 2, "restart_backoff_ms": 10}
    async with Dispatcher(manifest(crashing(**target))) as dispatcher:
        process = the_process(dispatcher)
        first = await dispatcher.call("crashing", "pid")
        os.kill(first, signal.SIGSTOP)  # alive but answering nothing
        await eventually(lambda: process.restarts == 1 and process.state == "running")
        assert await dispatcher.call("crashing", "pid", timeout=10) != first


async def test_an_executable_whose_sha256_differs_is_refused() -> None:
    with pytest.raises(ProviderError, match=r"refusing to start: .* SHA-256"):
        async with Dispatcher(manifest(crashing(sha256="0" * 64))):
            pass
    actual = hashlib.sha256(Path(sys.executable).read_bytes()).hexdigest()  # noqa: ASYNC240
    async with Dispatcher(manifest(crashing(sha256=actual.upper()))) as dispatcher:
        assert await dispatcher.call("crashing", "echo", {"value": 1}) == 1


async def test_no_common_protocol_version_fails_the_launch_with_the_plugins_reason() -> None:
    with pytest.raises(HandshakeError, match=r"(?s)exited with code 1 .*offered '2'"):
        async with Dispatcher(manifest(crashing(protocol_versions=[2]))):
            pass


async def test_a_plugin_that_never_answers_the_handshake_times_out() -> None:
    silent = {
        "id": "silent",
        "version": "1.0.0",
        "target": {
            "provider": "subprocess",
            "command": [sys.executable, "-c", "import time; time.sleep(60)"],
            "handshake_timeout_ms": 300,
        },
        "methods": {"x": {}},
    }
    started = time.monotonic()
    with pytest.raises(HandshakeError, match=r"no handshake line .*handshake_timeout_ms: 300"):
        async with Dispatcher(manifest(silent)):
            pass
    assert time.monotonic() - started < 5


async def test_a_plugin_that_closes_stdout_and_runs_on_times_out_as_a_silent_one() -> None:
    # Before, the end of its stdout was read as an exit, and the launch waited for one
    # for as long as the plugin ran (a minute here; for ever for a server).
    closed = {
        "id": "closed",
        "version": "1.0.0",
        "target": {
            "provider": "subprocess",
            "command": [sys.executable, "-c", "import os, time; os.close(1); time.sleep(60)"],
            "handshake_timeout_ms": 300,
        },
        "methods": {"x": {}},
    }
    started = time.monotonic()
    with pytest.raises(
        HandshakeError,
        match=r"closed its stdout without a handshake line .*handshake_timeout_ms: 300",
    ):
        async with Dispatcher(manifest(closed)):
            pass
    assert time.monotonic() - started < 5


async def test_a_malformed_handshake_line_is_refused() -> None:
    noisy = {
        "id": "noisy",
        "version": "1.0.0",
        "target": {
            "provider": "subprocess",
            "command": [
                sys.executable,
                "-c",
                "print('hello world', flush=True); import time; time.sleep(60)",
            ],
        },
        "methods": {"x": {}},
    }
    with pytest.raises(HandshakeError, match="malformed handshake line 'hello world'") as raised:
        async with Dispatcher(manifest(noisy)):
            pass
    assert "write logs and prints to stderr" in str(raised.value)  # what to do about it


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("{folder}/not-built-yet", "no such file (is the plugin built?)"),
        ("{folder}", "not an executable file"),
        ("{folder}/plain.txt", "not an executable file"),
        ("linchkit-no-such-program", "not found on the plugin's PATH"),
    ],
)
async def test_a_command_that_cannot_run_is_named_before_anything_starts(
    tmp_path: Path, command: str, why: str
) -> None:
    """Behind ``setpriv`` a missing file was "exited with code 127 before its handshake;
    ... setpriv: failed to execute ...": now one line that says what is wrong."""
    (tmp_path / "plain.txt").write_text("not a program")
    program = command.format(folder=tmp_path)
    entry = {
        "id": "unbuilt",
        "version": "1.0.0",
        "target": {"provider": "subprocess", "command": [program, "serve"]},
        "methods": {"x": {}},
    }
    with pytest.raises(ProviderError) as raised:
        async with Dispatcher(manifest(entry)):
            pass
    assert str(raised.value).endswith(f"cannot start {program}: {why}"), raised.value
    assert "setpriv" not in str(raised.value)


async def test_a_plugin_runs_in_a_session_of_its_own() -> None:
    """A terminal's Ctrl-C goes to its foreground process group: the dispatcher's, and
    before, its plugins', which died at once and failed every Stop and Destroy."""
    async with Dispatcher(manifest(crashing())) as dispatcher:
        pid = await dispatcher.call("crashing", "pid")
        assert os.getsid(pid) == pid != os.getsid(0)
        assert os.getpgid(pid) != os.getpgid(0)


def test_run_by_hand_the_plugin_prints_a_hint_and_exits_1() -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LINCHKIT_PLUGIN")}
    ran = subprocess.run(CRASHING, env=environment, capture_output=True, text=True, timeout=30)
    assert ran.returncode == 1
    assert "started by the dispatcher" in ran.stderr


async def test_tcp_without_tls_works_when_asked_for() -> None:
    async with Dispatcher(manifest(crashing(network="tcp", auto_mtls=False))) as dispatcher:
        process = the_process(dispatcher)
        assert process._child is not None
        assert process._child.connection is not None
        assert process._child.connection.address.startswith("127.0.0.1:")
        assert await dispatcher.call("crashing", "echo", {"value": "tcp"}) == "tcp"


@pytest.mark.parametrize("network", ["unix", "tcp"])
async def test_automtls_refuses_clients_without_the_hosts_certificate(network: str) -> None:
    async with Dispatcher(manifest(crashing(network=network))) as dispatcher:
        process = the_process(dispatcher)
        assert process._child is not None
        connection = process._child.connection
        assert connection is not None
        security = connection.security
        stranger = generate_certificate("stranger")
        attempts = {
            "plain text": grpc.aio.insecure_channel(connection.address),
            "tls, no client certificate": grpc.aio.secure_channel(
                connection.address,
                grpc.ssl_channel_credentials(root_certificates=security.root),
                options=[("grpc.ssl_target_name_override", "localhost")],
            ),
            "tls, another client certificate": grpc.aio.secure_channel(
                connection.address,
                grpc.ssl_channel_credentials(
                    root_certificates=security.root,
                    private_key=stranger.private_key_pem,
                    certificate_chain=stranger.certificate_pem,
                ),
                options=[("grpc.ssl_target_name_override", "localhost")],
            ),
        }
        for name, channel in attempts.items():
            stub = plugin_pb2_grpc.PluginServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Describe(plugin_pb2.DescribeRequest(), timeout=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, name
            await channel.close()
        # The host's own connection, with its certificate, still works.
        assert (await connection.describe_plugin(timeout=3))["id"] == "crashing"


def test_no_plugin_outlives_a_sigkilled_dispatcher() -> None:
    child = subprocess.Popen(
        [sys.executable, str(PLUGINS / "dispatcher_child.py"), *CRASHING],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SOURCE_PATH},
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line.isdigit(), f"the dispatcher child printed {line!r}"
        plugin_pid = int(line)
        assert alive(plugin_pid)
        child.kill()  # SIGKILL: no cleanup code runs in the dispatcher
        child.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(plugin_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(plugin_pid), f"plugin {plugin_pid} survived its dispatcher"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_the_parent_death_signal_alone_ends_a_child_that_ignores_stdin() -> None:
    # `sleep` never reads stdin, so only PR_SET_PDEATHSIG can end it when its parent dies.
    middle = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "import dispatcher\n"  # first: `import providers` alone is a circular import today
            "from providers.subprocess.child import with_parent_death_signal\n"
            "argv, preexec = with_parent_death_signal(['sleep', '60'])\n"
            "child = subprocess.Popen(argv, preexec_fn=preexec, stdin=subprocess.DEVNULL)\n"
            "time.sleep(0.3)\n"  # let setpriv exec sleep
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SOURCE_PATH},
    )
    try:
        assert middle.stdout is not None
        sleeper = int(middle.stdout.readline())
        assert alive(sleeper)
        middle.kill()
        middle.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(sleeper) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(sleeper), "the parent-death signal did not end the child"
    finally:
        if middle.poll() is None:
            middle.kill()
            middle.wait()
        if middle.stdout is not None:
            middle.stdout.close()


async def test_the_plugin_chooses_a_version_among_those_offered() -> None:
    async with Dispatcher(manifest(crashing(protocol_versions=[3, 1]))) as dispatcher:
        assert await dispatcher.call("crashing", "echo", {"value": "v1"}) == "v1"


async def test_a_plugin_that_will_not_exit_is_killed_after_the_grace_period() -> None:
    target = {"env": {"HANG_ON_EXIT": "1"}, "stop_grace_ms": 300}
    dispatcher = Dispatcher(manifest(crashing(**target)))
    async with dispatcher:
        pid = await dispatcher.call("crashing", "pid")
        process = the_process(dispatcher)
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert not alive(pid)
    assert process.exit_code == -signal.SIGKILL


async def test_a_stop_hook_within_the_sdks_cap_finishes_before_the_default_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every SDK gives its stop and destroy hooks 5 s at a stop; the host's default grace
    # covers that and more (STOP_GRACE_MS). At 3 s, a stop hook of 4 s was SIGKILLed
    # half-way and the plugin's destroy hook never ran.
    dispatcher = Dispatcher(manifest(crashing(env={"STOP_HOOK_MS": "4000"})))
    with caplog.at_level(logging.INFO, logger="dispatcher.plugin"):
        async with dispatcher:
            pid = await dispatcher.call("crashing", "pid")
            process = the_process(dispatcher)
    assert not alive(pid)
    assert process.exit_code == 0
    said = [record.getMessage() for record in caplog.records]
    assert any("stop hook ran" in line for line in said), said
    assert any("destroy hook ran" in line for line in said), said


def test_the_handshake_is_the_one_docs_protocol_md_describes() -> None:
    # The Go, Rust, Java and TypeScript SDKs speak these bytes: they are not ours to change.
    from linchkit_plugin import handshake
    from providers.subprocess.handshake import parse

    assert (handshake.MAGIC_COOKIE_KEY, handshake.MAGIC_COOKIE_VALUE) == (
        "LINCHKIT_PLUGIN_MAGIC_COOKIE",
        "d1spatch3r-pl4g1n",
    )
    line = handshake.HandshakeLine.of(1, "unix", "/tmp/lk-plugin-x1/plugin.sock", "MIIB")
    assert str(line) == "1|1|unix|/tmp/lk-plugin-x1/plugin.sock|grpc|MIIB"
    assert handshake.HandshakeLine.parse(str(line)) == line
    unix = {"network": "unix", "socket_folder": "/tmp/lk-plugin-x1"}
    assert parse(str(line), "p@1", [1], mtls=False, **unix) == (
        "unix:/tmp/lk-plugin-x1/plugin.sock",
        None,
    )
    with pytest.raises(HandshakeError, match="core version '2'; this host speaks 1"):
        parse("2|1|unix|/s|grpc|", "p@1", [1], mtls=False, **unix)


async def test_a_plugin_sigkilled_mid_burst_fails_calls_only_with_dispatch_errors() -> None:
    # 10,000 calls, 200 at a time; the plugin is SIGKILLed once 2,000 have answered. Calls
    # in flight on the dead child must fail as the dispatcher's errors: a bare
    # CancelledError (grpc cancels the calls of a channel it closes) would be
    # indistinguishable from the caller's own cancellation.
    total, concurrency, kill_after = 10_000, 200, 2_000
    outcomes: dict[str, int] = {}
    unexpected: list[BaseException] = []
    killed = asyncio.Event()
    async with Dispatcher(manifest(crashing(restart_backoff_ms=20))) as dispatcher:
        victim = await dispatcher.call("crashing", "pid")
        remaining = iter(range(total))

        async def worker() -> None:
            for _ in remaining:
                try:
                    await dispatcher.call("crashing", "echo", {"value": 1}, timeout=10)
                    name = "ok"
                except DispatchError as error:
                    name = type(error).__name__
                except BaseException as error:
                    name = f"NOT A DispatchError: {type(error).__name__}"
                    unexpected.append(error)
                outcomes[name] = outcomes.get(name, 0) + 1
                if not killed.is_set() and outcomes.get("ok", 0) >= kill_after:
                    killed.set()
                    os.kill(victim, signal.SIGKILL)

        started = time.monotonic()
        async with asyncio.timeout(120):  # no hang
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        print(f"\n{total} calls at concurrency {concurrency} in {elapsed:.1f} s: {outcomes}")
    assert killed.is_set()
    assert sum(outcomes.values()) == total
    assert not unexpected, f"outcomes by type: {outcomes}"
    assert outcomes["ok"] > kill_after  # the restarted plugin answered the rest


async def test_the_callers_own_cancellation_still_propagates() -> None:
    async with Dispatcher(manifest(crashing())) as dispatcher:
        call = asyncio.create_task(dispatcher.call("crashing", "nap", {"seconds": 30}, timeout=60))
        await asyncio.sleep(0.5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await dispatcher.call("crashing", "echo", {"value": "still"}) == "still"


async def test_closing_after_a_kill_and_restart_is_bounded_by_the_grace() -> None:
    # The dispatcher closes at any moment of a restart: the instant the supervisor sees the
    # death (a few loop turns after it, while it tears the dead child down), during the
    # backoff, the new child's launch and handshake, or once it runs. Each close must end
    # within stop_grace_ms plus a margin, and leave no plugin process behind.
    grace_s, margin_s = 0.5, 1.5
    target = {"restart_backoff_ms": 20, "stop_grace_ms": int(grace_s * 1000)}
    problems: list[str] = []
    for iteration in range(24):
        dispatcher = Dispatcher(manifest(crashing(**target)))
        await dispatcher.__aenter__()
        process = the_process(dispatcher)
        victim = await dispatcher.call("crashing", "pid")
        os.kill(victim, signal.SIGKILL)
        if iteration < 12:
            # Turn by turn on purpose: the close must land in the first loop turns after the death.
            while process.state != "restarting":  # noqa: ASYNC110
                await asyncio.sleep(0)
            for _ in range(iteration % 4):  # 0 to 3 loop turns into the teardown
                await asyncio.sleep(0)
        else:
            await asyncio.sleep(0.05 * (iteration - 12))  # 0 to 0.55 s
        started = time.monotonic()
        closing = asyncio.create_task(dispatcher.aclose())
        done, _ = await asyncio.wait({closing}, timeout=grace_s + margin_s)
        elapsed = time.monotonic() - started
        if not done:
            problems.append(f"iteration {iteration}: aclose still running after {elapsed:.1f} s")
            process._state = "failed"  # what the hung supervisor needs to give up
            for pid in plugin_children():
                os.kill(pid, signal.SIGKILL)
            await asyncio.wait({closing}, timeout=10)
        else:
            closing.result()
        left = plugin_children()
        if left:
            problems.append(f"iteration {iteration}: plugin processes {left} outlived aclose")
            for pid in left:
                os.kill(pid, signal.SIGKILL)
    assert not problems, "\n".join(problems)


WRAPPER = """#!/bin/sh
exec {python} {script} "$@"
"""


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_pinned_wrapper_whose_script_changed_is_refused_and_nothing_starts(
    tmp_path: Path,
) -> None:
    # The pin covers what runs: the wrapper, the interpreter and the plugin's script.
    script = tmp_path / "plugin.py"
    script.write_bytes((PLUGINS / "crashing_plugin.py").read_bytes())
    wrapper = tmp_path / "plugin.sh"
    wrapper.write_text(WRAPPER.format(python=sys.executable, script=script))
    wrapper.chmod(0o755)
    pins = {str(path): sha256_of(path) for path in (wrapper, script, Path(sys.executable))}
    pinned = crashing(sha256=pins)
    pinned["target"]["command"] = [str(wrapper)]
    async with Dispatcher(manifest(pinned)) as dispatcher:
        assert await dispatcher.call("crashing", "echo", {"value": "pinned"}) == "pinned"
    assert not plugin_children()

    with script.open("a") as tampered:
        tampered.write("\nprint('changed', file=__import__('sys').stderr)\n")
    with pytest.raises(ProviderError, match=rf"refusing to start: {script}: its SHA-256 is"):
        async with Dispatcher(manifest(pinned)):
            pass
    assert not plugin_children()  # nothing was started


def test_the_single_digest_form_pins_the_executable_and_the_map_form_every_file() -> None:
    target = manifest(crashing(sha256={"tests/plugins/crashing_plugin.py": "AB" * 32})).plugins[0]
    assert target.target.sha256 == {str(PLUGINS / "crashing_plugin.py"): "ab" * 32}
    with pytest.raises(Exception, match="pin at least one file"):
        manifest(crashing(sha256={}))


async def test_the_hosts_environment_does_not_reach_the_plugin_unless_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LINCHKIT_TEST_SECRET", "hunter2")
    monkeypatch.setenv("LC_TIME", "C")
    async with Dispatcher(manifest(crashing(env={"DECLARED": "yes"}))) as dispatcher:
        seen = await dispatcher.call("crashing", "environment")
    assert "LINCHKIT_TEST_SECRET" not in seen
    assert seen["DECLARED"] == "yes"
    assert seen["PATH"] == os.environ["PATH"]
    assert seen["LC_TIME"] == "C"
    assert seen["LINCHKIT_PLUGIN_MAGIC_COOKIE"] == "d1spatch3r-pl4g1n"
    allowed = {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "DECLARED", "PYTHONPATH"}
    leaked = {
        name
        for name in seen
        if name not in allowed and not name.startswith(("LC_", "LINCHKIT_PLUGIN_"))
    }
    assert leaked <= {"PWD", "SHLVL", "_"}, leaked  # what an interpreter or a shell adds itself

    for opt_in in (["LINCHKIT_TEST_SECRET"], True):
        async with Dispatcher(manifest(crashing(inherit_env=opt_in))) as dispatcher:
            seen = await dispatcher.call("crashing", "environment")
        assert seen["LINCHKIT_TEST_SECRET"] == "hunter2", opt_in


async def test_restarts_leave_no_events_reader_behind_and_lose_no_host_event() -> None:
    """grpc.aio reads a stream's requests in a task of its own, cancelled only when the
    call is cancelled while running: each restart left one waiting on the host-event
    queue for good (4 after 4 restarts, still there after ``aclose``), each taking
    host events meant for the live stream."""
    from tests.test_stream_and_event_policies import example

    def readers() -> int:
        return sum(
            1
            for task in asyncio.all_tasks()
            if "_consume_request_iterator" in task.get_coro().__qualname__  # type: ignore[union-attr]
        )

    entry = example()
    entry["target"] = {**entry["target"], "restart_backoff_ms": 20}
    async with Dispatcher(manifest(entry)) as dispatcher:
        process = the_process(dispatcher)
        pongs: asyncio.Queue[Any] = asyncio.Queue()
        dispatcher.on("example", "pong", lambda _event, data: pongs.put_nowait(data))
        for restart in range(1, 4):
            assert process._child is not None
            os.kill(process._child.pid, signal.SIGKILL)
            await eventually(
                lambda restart=restart: process.restarts == restart and process.state == "running"
            )
        await dispatcher.call("example", "sleep", {"ms": 1}, timeout=10)
        assert readers() <= 1
        for number in range(10):
            await dispatcher.publish("example", "ping", number)
        got = [await asyncio.wait_for(pongs.get(), 10) for _ in range(10)]
        assert sorted(got) == list(range(10))
    await asyncio.sleep(0.1)
    assert readers() == 0
