"""A subprocess plugin that lies in its handshake, run in its sandbox: the address it
announces is the host's to dial, so it must be the plugin's own socket; and its output,
however long its lines, is read to the end (tests/plugins/hostile_handshake.py)."""

from __future__ import annotations

import logging
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Dispatcher
from providers.subprocess import HandshakeError
from tests.conftest import manifest
from tests.sandbox_support import (
    PLUGINS,
    heard,
    open_folder,
    remove,
    unix_listener_fixture,  # noqa: F401  (the fixture `unix_listener`)
)

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no /usr/bin/python3"),
]


@pytest.fixture(scope="module")
def hostile() -> Iterator[Path]:
    """The plugin, copied into a folder the sandbox's user may enter."""
    folder = open_folder("hostile-handshake-")
    executable = Path(shutil.copy(PLUGINS / "hostile_handshake.py", folder))
    executable.chmod(0o755)
    yield executable
    remove(folder)


def plugin(executable: Path, **env: str) -> dict[str, Any]:
    return {
        "id": "hostile",
        "version": "1.0.0",
        "target": {
            "provider": "subprocess",
            "command": [str(executable)],
            "env": env,
            "sandbox": True,
            "auto_mtls": False,
            "restart": False,
            "handshake_timeout_ms": 3000,
        },
        "methods": {"x": {}},
    }


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    yield listener
    listener.close()


async def test_a_plugin_without_network_cannot_have_the_host_dial_a_port_for_it(
    hostile: Path, tcp_listener: socket.socket
) -> None:
    # Its target speaks unix; a sandbox without network: it announces a TCP port of the
    # host's loopback. Dialled, every call would go to whoever listens there.
    address = f"127.0.0.1:{tcp_listener.getsockname()[1]}"
    lying = plugin(hostile, HOSTILE="announce", NETWORK="tcp", ADDRESS=address)
    with pytest.raises(HandshakeError, match="the target's network is unix"):
        async with Dispatcher(manifest(lying)):
            pass
    assert not heard(tcp_listener)


@pytest.mark.parametrize("how", ["announce", "symlink"])
async def test_a_plugin_cannot_have_the_host_dial_a_host_socket_for_it(
    hostile: Path, unix_listener: socket.socket, how: str
) -> None:
    # A socket outside the folder made for it, named outright or through a symlink
    # planted in that folder.
    address = unix_listener.getsockname()
    lying = plugin(hostile, HOSTILE=how, NETWORK="unix", ADDRESS=address)
    with pytest.raises(HandshakeError, match=r"a socket in|not a socket"):
        async with Dispatcher(manifest(lying)):
            pass
    assert not heard(unix_listener)


async def test_an_endless_first_line_on_stdout_is_a_handshake_error(hostile: Path) -> None:
    with pytest.raises(HandshakeError, match="no line break in its first 64 KiB"):
        async with Dispatcher(manifest(plugin(hostile, HOSTILE="long-stdout"))):
            pass


async def test_a_long_stderr_line_does_not_stop_the_lines_after_it_being_logged(
    hostile: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = "ERROR the line after the long one"
    lying = plugin(hostile, HOSTILE="long-stderr", MARKER=marker)
    with (
        caplog.at_level(logging.INFO, logger="dispatcher.plugin.hostile"),
        pytest.raises(HandshakeError, match="exited with code 3") as raised,
    ):
        async with Dispatcher(manifest(lying)):
            pass
    assert marker in str(raised.value)
    assert [r.levelno for r in caplog.records if r.getMessage() == marker] == [logging.ERROR]
    assert max(len(r.getMessage()) for r in caplog.records) <= 64 * 1024
