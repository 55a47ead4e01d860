"""A uid of its own for each sandboxed plugin, when the dispatcher runs as root.

Plugins that share a uid share every limit the kernel keeps per user, host-wide: inotify
instances (128 by default: one plugin holding them kept every other plugin of its uid
from watching a file, measured), inotify watches, epoll watches, pipe buffer pages,
pending signals, POSIX message queue bytes. So a plugin without ``sandbox.user`` runs as
a uid claimed for it alone from ``PLUGIN_UIDS``, its gid the same number.

The range, 2000000000-2000065535, lies in what systemd's table of uid ranges leaves
unused (above its container uids, which end at 1879048191, and below 2^31, where some
tools read a uid as negative), away from login users, ``DynamicUser=`` (61184-65519) and
the subordinate ranges of ``/etc/subuid`` (100000 upwards). A uid is never handed out while the user database names it or a range
of ``/etc/subuid`` or ``/etc/subgid`` holds it.

Claimed with ``flock`` on ``/run/linchkit/plugin-uids/<uid>``, held open until the plugin
stops: two dispatchers on one host (or two plugins of one dispatcher: each claim is an
open file of its own) never hold the same uid, and a dispatcher that dies, however it
dies, lets go of its claims with its descriptors. Dispatchers that share a host's uids
must share its ``/run`` (a dispatcher in a container of its own, without a user namespace,
needs ``/run/linchkit`` mounted from the host). The lock files stay: removing one while
another dispatcher opens it would let two hold "the same" uid on two inodes.

A plugin is offered the uid its id hashes to first, then the next free one: across
restarts of the dispatcher it usually runs as the same uid, so files it wrote in a folder
granted ``rw`` are still its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import zlib
from pathlib import Path

__all__ = ["CLAIMS_FOLDER", "PLUGIN_UIDS", "UidClaim", "UidUnavailable", "claim_uid"]

#: Where plugins' uids come from (see the module's docstring for why here).
PLUGIN_UIDS = range(2_000_000_000, 2_000_000_000 + 65_536)

#: One lock file per uid ever claimed on this host.
CLAIMS_FOLDER = Path("/run/linchkit/plugin-uids")


class UidUnavailable(OSError):
    """No uid of ``PLUGIN_UIDS`` could be claimed (the folder is not writable, or all are held)."""


class UidClaim:
    """A uid held for one plugin until ``release``; its gid is the same number."""

    def __init__(self, uid: int, descriptor: int) -> None:
        self.uid = uid
        self._descriptor: int | None = descriptor

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def release(self) -> None:
        """Let another plugin, of this dispatcher or another, have the uid (idempotent)."""
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is not None:
            os.close(descriptor)  # closing the last descriptor of the file drops the lock

    def __repr__(self) -> str:
        return f"<UidClaim {self.uid} {'held' if self.held else 'released'}>"


def claim_uid(name: str, *, uids: range = PLUGIN_UIDS, folder: Path = CLAIMS_FOLDER) -> UidClaim:
    """Claim a uid of ``uids`` that nothing else holds, preferring the one ``name`` hashes to.

    ``UidUnavailable`` when the claims folder cannot be made or every uid is taken."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise UidUnavailable(
            error.errno or errno.EACCES, f"cannot make {folder}: {error.strerror}"
        ) from None
    delegated = _delegated_ranges()
    first = zlib.crc32(name.encode()) % len(uids)
    for step in range(len(uids)):
        uid = uids[(first + step) % len(uids)]
        if any(uid in taken for taken in delegated) or _named(uid):
            continue
        try:
            descriptor = os.open(
                folder / str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as error:
            raise UidUnavailable(
                error.errno or errno.EACCES, f"cannot claim uid {uid} in {folder}: {error.strerror}"
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            continue
        except OSError as error:
            os.close(descriptor)
            raise UidUnavailable(
                error.errno or errno.EACCES, f"cannot lock {folder / str(uid)}: {error.strerror}"
            ) from None
        return UidClaim(uid, descriptor)
    raise UidUnavailable(
        errno.EUSERS, f"every uid of {uids.start}-{uids.stop - 1} is claimed (see {folder})"
    )


def _named(uid: int) -> bool:
    """Whether the user or group database has ``uid`` (as a uid, or as a gid)."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
        except KeyError:
            continue
        return True
    return False


def _delegated_ranges() -> list[range]:
    """The subordinate uid and gid ranges given to users (``/etc/subuid``, ``/etc/subgid``)."""
    ranges: list[range] = []
    for path in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(OSError), open(path, encoding="utf-8") as lines:
            for line in lines:
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                    start = int(fields[1])
                    ranges.append(range(start, start + int(fields[2])))
    return ranges
