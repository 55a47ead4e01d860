"""A plugin's Unix socket, pinned: the host connects only to the socket the plugin made.

The plugin's socket folder is the plugin's to write (a container's bind mount, a
sandboxed subprocess's folder), so it can put anything at its socket's name, at any time:
a symlink to a host socket (the Docker engine's, a database's, another plugin's), a FIFO,
a regular file. ``connect(2)`` follows symlinks and has no ``O_NOFOLLOW``, so checking
the path and then connecting to it races with the plugin, and every new connection (an
HTTP pool's, grpc's reconnect after a drop) dials the path again. Instead:

1. the folder is opened ``O_PATH | O_DIRECTORY | O_NOFOLLOW`` and the socket opened
   relative to it with ``O_PATH | O_NOFOLLOW``: that names the directory entry itself,
   never what a symlink points to;
2. ``fstat`` of that descriptor must be a socket on the folder's own file system (not a
   symlink, FIFO, file or directory; a hard link to a socket elsewhere cannot be made
   across a bind mount);
3. the host connects to ``/proc/self/fd/N``: the kernel resolves it to the pinned inode,
   whatever the plugin does to the folder afterwards, for the first connection as for
   every reconnect;
4. ``check`` looks at the entry again (``fstatat``, no follow): if it is no longer the
   pinned socket, the plugin tampered with it; the incident is logged once, and from then
   on ``check`` and ``pin`` raise ``SocketTampered``. What the provider does then is its
   own (Docker refuses every call and replaces the container; a subprocess is killed).

Owner: the socket's uid is not compared with the plugin's user (a container's
``sandbox.user`` may be a name, and a user-namespaced engine maps uids); only the plugin
can write to the folder (its parent is the dispatcher's, mode 0700), so a socket found
there and pinned was made by the plugin.

``close`` lets go of both descriptors: the provider calls it when the plugin ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from typing import NoReturn

__all__ = ["PinnedSocket", "SocketTampered"]


class SocketTampered(OSError):
    """The plugin put something other than its own socket where the host connects."""


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "not a socket"


class PinnedSocket:
    """``path``'s socket, once the plugin has made it (``pin``), and checks that it stays."""

    def __init__(self, path: str, owner: str, log: logging.Logger, consequence: str) -> None:
        """``owner`` names the plugin in the incident's log line ("container …"), ``log``
        is the provider's logger, ``consequence`` what the provider does about it."""
        self.path = path
        self._folder, self._name = os.path.split(path)
        self._owner = owner
        self._log = log
        self._consequence = consequence
        self._folder_fd: int | None = None
        self._socket_fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._incident: str | None = None

    def pin(self) -> str:
        """Pin the socket; the path to connect to. ``FileNotFoundError`` while the plugin
        has not made it yet; ``SocketTampered`` if something else is there."""
        if self._incident is not None:
            raise SocketTampered(self._incident)
        if self._socket_fd is not None:
            return f"/proc/self/fd/{self._socket_fd}"
        if self._folder_fd is None:
            self._folder_fd = os.open(
                self._folder, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        descriptor = os.open(
            self._name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._folder_fd
        )
        found = os.fstat(descriptor)
        folder = os.fstat(self._folder_fd)
        if not stat.S_ISSOCK(found.st_mode) or found.st_dev != folder.st_dev:
            os.close(descriptor)
            what = (
                _kind(found.st_mode) if not stat.S_ISSOCK(found.st_mode) else "a socket elsewhere"
            )
            self._tampered(f"made its {self._name} {what}, not the socket it was to create")
        self._socket_fd = descriptor
        self._identity = (found.st_dev, found.st_ino)
        return f"/proc/self/fd/{descriptor}"

    def check(self) -> None:
        """``SocketTampered`` if the folder no longer holds the pinned socket (a call's worth
        of cost: one ``fstatat``)."""
        if self._incident is not None:
            raise SocketTampered(self._incident)
        if self._folder_fd is None:
            return  # not pinned yet, or closed: nothing is dialled through it
        try:
            now = os.stat(self._name, dir_fd=self._folder_fd, follow_symlinks=False)
        except FileNotFoundError:
            self._tampered(f"removed its {self._name}")
        if (now.st_dev, now.st_ino) != self._identity:
            self._tampered(f"replaced its {self._name} with {_kind_or_socket(now.st_mode)}")

    def _tampered(self, what: str) -> NoReturn:
        self._incident = f"{what} (at {self.path})"
        target = ""
        if self._folder_fd is not None:
            with contextlib.suppress(OSError):  # not a symlink: nothing to add
                target = f" pointing to {os.readlink(self._name, dir_fd=self._folder_fd)!r}"
        self._log.error(
            "security: %s %s%s; the host will not connect there, and %s",
            self._owner,
            self._incident,
            target,
            self._consequence,
        )
        raise SocketTampered(self._incident)

    def close(self) -> None:
        """Close the descriptors (idempotent); ``pin`` opens them anew."""
        for descriptor in (self._socket_fd, self._folder_fd):
            if descriptor is not None:
                os.close(descriptor)
        self._socket_fd = self._folder_fd = None

    def __repr__(self) -> str:
        state = "tampered" if self._incident else "pinned" if self._socket_fd else "waiting"
        return f"<PinnedSocket {self.path} {state}>"


def _kind_or_socket(mode: int) -> str:
    return "another socket" if stat.S_ISSOCK(mode) else _kind(mode)
