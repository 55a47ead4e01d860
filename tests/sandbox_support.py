"""What the sandbox tests share: the hostile Go plugins built once, offline, into folders
the sandbox's user (65534) may enter."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.sdk_toolchains import GO, OFFLINE, require, succeed

PLUGINS = ROOT / "tests" / "plugins"


def open_folder(prefix: str, mode: int = 0o755) -> Path:
    """A fresh folder under /tmp that others may enter (pytest's tmp_path is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(mode)
    return folder


def build_static(source: str, folder: Path, name: str) -> Path:
    """``tests/plugins/<source>`` built as one static binary ``folder/name``."""
    require(GO)
    executable = folder / name
    succeed(
        [GO, "build", "-trimpath", "-buildvcs=false", "-o", str(executable), "."],
        PLUGINS / source,
        CGO_ENABLED="0",
        GOFLAGS="-mod=mod",
        **OFFLINE,
    )
    return executable


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(name="unix_listener")
def unix_listener_fixture() -> Iterator[socket.socket]:
    """A Unix socket of the host's, outside anything the plugin is shown, listening and
    never accepting on its own: ``heard`` says whether anyone connected."""
    folder = open_folder("host-socket-")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(folder / "host.sock"))
    listener.listen()
    listener.setblocking(False)
    yield listener
    listener.close()
    remove(folder)


def heard(listener: socket.socket) -> bool:
    try:
        connection, _ = listener.accept()
    except BlockingIOError:
        return False
    connection.close()
    return True
