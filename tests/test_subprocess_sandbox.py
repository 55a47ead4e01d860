"""provider: subprocess with ``sandbox:``: a real hostile plugin (Go, tests/plugins/
sandbox_hostile) under real bubblewrap, seccomp and resource limits.

Each test asks the plugin to do what a sandboxed plugin must not, and checks both the
plugin's answer and the host's side (a listener that hears nothing, a file not written).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Dispatcher, DispatchError, PluginError, TargetUnavailable
from providers.subprocess.uids import CLAIMS_FOLDER, PLUGIN_UIDS
from tests.conftest import ROOT, manifest
from tests.sandbox_support import (
    PLUGINS,
    build_static,
    heard,
    open_folder,
    remove,
    unix_listener_fixture,  # noqa: F401  (the fixture `unix_listener`)
)

pytestmark = [
    pytest.mark.toolchain,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]

METHODS = (
    "whoami",
    "connect",
    "read",
    "write",
    "env",
    "spawn",
    "ptrace",
    "namespace",
    "fill",
    "io_uring",
    "inotify",
    "swap_socket",
)


@pytest.fixture(scope="module")
def hostile_executable() -> Iterator[Path]:
    """The plugin, built into a folder of its own that the sandbox's user may enter."""
    folder = open_folder("sandbox-plugin-")
    yield build_static("sandbox_hostile", folder, "hostile")
    remove(folder)


def sandboxed(
    executable: Path, capabilities: dict[str, Any] | None = None, **target: Any
) -> dict[str, Any]:
    return {
        "id": "hostile",
        "version": "1.0.0",
        "capabilities": capabilities or {},
        "target": {
            "provider": "subprocess",
            "command": [str(executable)],
            "sandbox": True,
            "restart_backoff_ms": 50,
            **target,
        },
        "methods": {name: {} for name in METHODS},
    }


@pytest.fixture
async def dispatcher(hostile_executable: Path) -> AsyncIterator[Dispatcher]:
    async with Dispatcher(manifest(sandboxed(hostile_executable, {"pids": 24}))) as running:
        yield running


@pytest.fixture
def host_folder() -> Iterator[Path]:
    """A host folder outside the plugin's view (and readable by its user, were it visible)."""
    folder = open_folder("sandbox-host-", 0o777)
    yield folder
    remove(folder)


async def call(dispatcher: Dispatcher, method: str, **params: Any) -> Any:
    return await dispatcher.call("hostile", method, params, timeout=20)


async def answers_again(dispatcher: Dispatcher, plugin: str = "hostile") -> dict[str, Any]:
    """``whoami`` of ``plugin`` once it answers again (it is restarting), within 20 s."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return await dispatcher.call(plugin, "whoami", {}, timeout=20)  # type: ignore[no-any-return]
        except TargetUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def spawned_to_the_limit(dispatcher: Dispatcher) -> dict[str, Any]:
    """``spawn`` to the plugin's process limit, holding what started. At the limit itself
    the Go runtime of the plugin may need a thread of its own and die ("failed to create
    new OS thread": its children go with it); the plugin is restarted and asked again,
    at most twice, so the test goes on from a plugin that holds its limit."""
    for attempt in range(3):
        try:
            return await call(dispatcher, "spawn", n=500, hold=True)  # type: ignore[no-any-return]
        except TargetUnavailable:
            if attempt == 2:
                raise
            await answers_again(dispatcher)
    raise AssertionError("unreachable")


async def test_the_plugin_runs_unprivileged_in_its_own_namespaces(dispatcher: Dispatcher) -> None:
    me = await call(dispatcher, "whoami")
    assert me["no_new_privs"] == "1"
    assert me["pid"] < 10  # its own PID namespace: it cannot see, let alone signal, ours
    if os.geteuid() == 0:
        assert me["uid"] in PLUGIN_UIDS  # a uid of its own (providers.subprocess.uids)


async def test_network_egress_fails_and_a_loopback_listener_hears_nothing(
    dispatcher: Dispatcher,
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        for address in (f"127.0.0.1:{port}", "1.1.1.1:443"):
            with pytest.raises(PluginError) as caught:
                await call(dispatcher, "connect", address=address)
            assert caught.value.remote_type == "NetworkError"
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


async def test_writing_outside_its_tmp_fails_and_its_tmp_is_private(
    dispatcher: Dispatcher, host_folder: Path, hostile_executable: Path
) -> None:
    for path in (
        host_folder / "dropped",
        hostile_executable.parent / "dropped",
        Path("/usr/dropped"),
    ):
        with pytest.raises(PluginError) as caught:
            await call(dispatcher, "write", path=str(path))
        assert caught.value.remote_type == "FileError"
        assert not path.exists()
    name = f"/tmp/sandbox-private-{os.getpid()}"
    assert await call(dispatcher, "write", path=name) is True
    assert not Path(name).exists()  # noqa: ASYNC240 - the plugin's /tmp is its own


async def test_reading_a_host_file_outside_its_view_fails(
    dispatcher: Dispatcher, host_folder: Path
) -> None:
    secret = host_folder / "secret"
    secret.write_text("host secret")
    secret.chmod(0o644)
    for path in (secret, Path("/etc/passwd"), Path("/root/.bashrc")):
        with pytest.raises(PluginError) as caught:
            await call(dispatcher, "read", path=str(path))
        assert caught.value.remote_type == "FileError"


async def test_a_fork_bomb_stops_at_the_process_limit(dispatcher: Dispatcher) -> None:
    outcome = await call(dispatcher, "spawn", n=500)
    assert outcome["started"] < 24
    assert "resource temporarily unavailable" in outcome["error"]
    assert (await call(dispatcher, "whoami"))["no_new_privs"] == "1"  # still serving


@pytest.mark.skipif(os.geteuid() != 0, reason="runs plugins as users other than the dispatcher's")
@pytest.mark.parametrize("user", [None, "65534:65534"], ids=["uids of their own", "one user"])
async def test_a_plugin_holding_its_process_limit_keeps_no_other_plugin_from_starting(
    hostile_executable: Path, user: str | None
) -> None:
    # RLIMIT_NPROC counts the processes and threads of a real uid. Every plugin ran as
    # 65534, and the limit, set before bwrap, counted all of them: one holding its limit
    # kept the next plugin from starting ("bwrap: Creating new namespace failed") and any
    # plugin from restarting. Each plugin now has a uid of its own, and the limit, set
    # inside its user namespace, counts its own processes even when an operator gives two
    # plugins the same user.
    sandbox = {"user": user} if user else True
    bomber = sandboxed(hostile_executable, {"pids": 32}, sandbox=sandbox)
    other = {**sandboxed(hostile_executable, {"pids": 32}, sandbox=sandbox), "id": "other"}
    async with Dispatcher(manifest(bomber)) as first:
        held = await spawned_to_the_limit(first)
        assert "resource temporarily unavailable" in held["error"]
        async with Dispatcher(manifest(other)) as second:  # a launch
            me = await second.call("other", "whoami", {}, timeout=20)
            assert me["pid"] < 10
            with pytest.raises(TargetUnavailable):  # killed by the filter: a restart
                await second.call("other", "ptrace", {}, timeout=20)
            assert (await answers_again(second, "other"))["pid"] < 10
        if user is None:
            assert (await call(first, "whoami"))["uid"] != me["uid"]


@pytest.mark.skipif(os.geteuid() != 0, reason="runs plugins as users other than the dispatcher's")
@pytest.mark.parametrize("user", [None, "65534:65534"], ids=["uids of their own", "one user"])
async def test_a_plugin_holding_the_inotify_instances_of_its_uid_keeps_them_from_others_of_it(
    hostile_executable: Path, user: str | None
) -> None:
    # The kernel keeps some limits per uid on the whole host, whatever the namespaces:
    # inotify instances (128 by default), inotify and epoll watches, pending signals,
    # message queues, pipe buffers. Plugins that share a uid share them; a uid of its own
    # is what keeps them apart.
    sandbox = {"user": user} if user else True
    hog = sandboxed(hostile_executable, sandbox=sandbox)
    other = {**sandboxed(hostile_executable, sandbox=sandbox), "id": "other"}
    async with Dispatcher(manifest(hog, other)) as dispatcher:
        held = await call(dispatcher, "inotify", hold=True)
        assert "too many open files" in held["error"]
        theirs = await dispatcher.call("other", "inotify", {}, timeout=20)
    if user is None:
        assert theirs == {"opened": held["opened"], "error": held["error"]}
    else:  # what an operator accepts by giving plugins one user
        assert theirs["opened"] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="plugins run as users of their own only as root")
async def test_a_plugins_uid_is_claimed_while_it_runs_and_released_when_it_stops(
    hostile_executable: Path,
) -> None:
    def claimed_elsewhere(uid: int) -> bool:  # what another dispatcher's claim would meet
        descriptor = os.open(CLAIMS_FOLDER / str(uid), os.O_RDWR)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(descriptor)
        return False

    async with Dispatcher(manifest(sandboxed(hostile_executable))) as dispatcher:
        uid = (await call(dispatcher, "whoami"))["uid"]
        assert claimed_elsewhere(uid)
        with pytest.raises(TargetUnavailable):  # killed by the filter: a restart
            await call(dispatcher, "ptrace")
        assert (await answers_again(dispatcher))["uid"] == uid  # kept across restarts
    assert not claimed_elsewhere(uid)


def _system_python_is_ours() -> bool:
    """Whether /usr/bin/python3 can import this interpreter's packages (same version)."""
    try:
        shown = subprocess.run(
            ["/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except OSError:
        return False
    return shown.stdout.strip() == str(sys.version_info[:2])


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a dispatcher as another user")
async def test_not_as_root_neither_the_dispatchers_threads_nor_a_plugin_at_its_limit_keep_a_plugin_from_starting(
    hostile_executable: Path,
) -> None:
    # Not root: the plugins run as the dispatcher's uid. RLIMIT_NPROC set outside their
    # user namespaces counted every thread of that uid: a dispatcher with 40 threads of
    # its own could not start a plugin with pids 32, and one plugin at its limit kept the
    # next from starting.
    if not await asyncio.to_thread(_system_python_is_ours):
        pytest.skip("/usr/bin/python3 is not this interpreter's version")
    packages = sysconfig.get_paths()["purelib"]
    done = await asyncio.to_thread(
        subprocess.run,
        [
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
            "/usr/bin/python3", str(PLUGINS / "nonroot_dispatcher.py"), str(hostile_executable),
        ],
        env={
            "PATH": os.environ["PATH"],
            "HOME": "/tmp",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python"), packages]),
        },
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["dispatcher_uid"] == seen["first"]["uid"] == seen["second"]["uid"] == 65534
    assert "resource temporarily unavailable" in seen["held"]["error"]
    assert seen["second"]["pid"] < 10
    assert seen["dispatcher_forks"]


async def test_a_forbidden_syscall_kills_only_the_plugin_which_restarts(
    dispatcher: Dispatcher,
) -> None:
    before = dispatcher.providers["subprocess"]._processes  # type: ignore[attr-defined]
    (process,) = before.values()
    first_pid = process.pid
    with pytest.raises(TargetUnavailable):
        await call(dispatcher, "ptrace")
    await answers_again(dispatcher)  # restarted as configured (restart: true, backoff 50 ms)
    assert process.pid != first_pid
    assert process.restarts == 1


async def test_a_socket_swapped_for_a_symlink_after_the_handshake_is_not_followed(
    dispatcher: Dispatcher, unix_listener: socket.socket
) -> None:
    # The handshake checks the socket once; the host dials it again whenever the
    # connection drops. The plugin moves its socket aside, puts a symlink to a host socket
    # in its place, and drops the connection: the host's reconnect went there (with
    # auto_mtls: false, its calls in plain text).
    assert (await call(dispatcher, "whoami"))["pid"] < 10
    await call(dispatcher, "swap_socket", address=unix_listener.getsockname())
    await asyncio.sleep(0.6)  # the plugin drops the connection 200 ms after answering
    try:
        answer = await dispatcher.call("hostile", "whoami", {}, timeout=5)
    except DispatchError:
        pass  # refused, as the dispatcher's own error: acceptable
    else:
        assert answer["pid"] < 10  # the real plugin, through the socket it made
    assert not heard(unix_listener)


async def test_a_plugin_that_swaps_its_socket_is_caught_killed_and_restarted(
    hostile_executable: Path, unix_listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    # Never dialled there (above), but a plugin that tries is hostile: its health pings
    # look at the folder again.
    plugin = sandboxed(hostile_executable, {"pids": 24}, health_interval_ms=100)
    with caplog.at_level(logging.ERROR, logger="dispatcher.providers.subprocess"):
        async with Dispatcher(manifest(plugin)) as dispatcher:
            (process,) = dispatcher.providers["subprocess"]._processes.values()  # type: ignore[attr-defined]
            first_pid = process.pid
            with contextlib.suppress(TargetUnavailable):  # caught before it could answer
                await call(dispatcher, "swap_socket", address=unix_listener.getsockname())
            deadline = time.monotonic() + 20
            while process.restarts == 0 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            assert (await answers_again(dispatcher))["pid"] < 10
            assert process.pid != first_pid
    assert f"security: plugin hostile@1.0.0 (pid {first_pid}) replaced its plugin-" in caplog.text
    assert "with a symlink (at " in caplog.text
    assert repr(unix_listener.getsockname()) in caplog.text  # where it pointed
    assert not heard(unix_listener)


async def test_namespaces_made_by_clone_kill_the_plugin_as_unshare_does(
    dispatcher: Dispatcher,
) -> None:
    # clone(CLONE_NEWUSER | CLONE_NEWNET): a user namespace where the plugin holds every
    # capability, what the filter's unshare rule is there to refuse.
    with pytest.raises(TargetUnavailable):
        await call(dispatcher, "namespace")


async def test_io_uring_is_unavailable_to_the_plugin(dispatcher: Dispatcher) -> None:
    # Its work runs in kernel threads the filter does not see; before, the ring was made.
    outcome = await call(dispatcher, "io_uring")
    assert outcome == {"created": False, "errno": errno.ENOSYS}
    assert (await call(dispatcher, "whoami"))["no_new_privs"] == "1"  # still serving


async def test_without_the_filter_bubblewrap_still_refuses_a_user_namespace(
    hostile_executable: Path,
) -> None:
    plugin = sandboxed(hostile_executable, sandbox={"seccomp": False})
    async with Dispatcher(manifest(plugin)) as dispatcher:
        outcome = await call(dispatcher, "namespace")
    assert outcome["created"] is False
    assert outcome["error"]


async def test_the_private_tmp_is_bounded(hostile_executable: Path) -> None:
    # /tmp is a tmpfs: host memory that RLIMIT_AS (memory_mb) does not count, half the
    # host's RAM by default.
    plugin = sandboxed(hostile_executable, sandbox={"tmp_mb": 8})
    async with Dispatcher(manifest(plugin)) as dispatcher:
        outcome = await call(dispatcher, "fill", path="/tmp/hog", mb=48)
        assert outcome["mb"] <= 8
        assert "no space left on device" in outcome["error"]
        assert (await call(dispatcher, "whoami"))["no_new_privs"] == "1"  # still serving


async def test_granted_files_and_variables_are_visible_as_granted(
    hostile_executable: Path, host_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readable, writable = host_folder / "ro", host_folder / "rw"
    for folder in (readable, writable):
        folder.mkdir()
        folder.chmod(0o777)
    (readable / "data").write_text("granted")
    capabilities = {
        "files": [{"path": str(readable), "mode": "ro"}, {"path": str(writable), "mode": "rw"}],
    }
    async with Dispatcher(manifest(sandboxed(hostile_executable, capabilities))) as dispatcher:
        assert await call(dispatcher, "read", path=str(readable / "data")) == "granted"
        with pytest.raises(PluginError):
            await call(dispatcher, "write", path=str(readable / "new"))
        assert await call(dispatcher, "write", path=str(writable / "new")) is True
    assert (writable / "new").read_text() == "written by the plugin"


async def test_what_cannot_be_enforced_is_reported_at_attach(
    hostile_executable: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = sandboxed(hostile_executable, {"network": ["10.0.0.0/8"]})
    with caplog.at_level(logging.WARNING, logger="dispatcher.providers.subprocess"):
        async with Dispatcher(manifest(plugin)) as dispatcher:
            spec = dispatcher.manifest.plugins[0]
            translation = dispatcher.providers["subprocess"].sandbox(spec, spec.target)
    assert translation is not None
    assert any(
        "network: limited to 10.0.0.0/8 is not enforced" in line for line in translation.unenforced
    )
    assert "network: limited to 10.0.0.0/8 is not enforced" in caplog.text
