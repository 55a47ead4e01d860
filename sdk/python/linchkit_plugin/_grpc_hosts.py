"""The hosts attached to a plugin service at once (docs/protocol.md, "Several hosts on one
service"): the replicas of a dispatcher, or one dispatcher and the next in a rolling
restart. Each names itself with the ``linchkit-host`` metadata on lifecycle RPCs; the
plugin's ``stop`` and ``destroy`` hooks run only when the last of them leaves, so no host's
``Stop`` runs under another's calls. RPCs without it count as one host whose id is empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from linchkit_plugin.handshake import HOST_METADATA

__all__ = ["MAX_HOSTS", "AttachedHosts", "host_of"]
#: The most hosts a service tracks: an ``Init`` from one more is refused.
MAX_HOSTS = 1024

_HOST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def host_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The calling host's id; "" when it sent none. ``ValueError`` for an id off the
    contract (the message does not quote it)."""
    for key, value in metadata or ():
        if key != HOST_METADATA:
            continue
        if isinstance(value, str) and _HOST_ID.fullmatch(value):
            return value
        raise ValueError(f"{HOST_METADATA} must be 1-64 of A-Z a-z 0-9 . _ -")
    return ""


class AttachedHosts:
    """Hosts whose ``Init`` succeeded and that have not sent ``Stop`` or ``Destroy`` since."""

    __slots__ = ("_hosts",)

    def __init__(self) -> None:
        self._hosts: set[str] = set()

    def has_room_for(self, host: str) -> bool:
        return host in self._hosts or len(self._hosts) < MAX_HOSTS

    def add(self, host: str) -> None:
        self._hosts.add(host)

    def others_stay(self, leaving: str) -> bool:
        """Take ``leaving`` out; whether another host is still attached (then its
        ``Stop``/``Destroy`` runs no hook)."""
        self._hosts.discard(leaving)
        return bool(self._hosts)

    def __len__(self) -> int:
        return len(self._hosts)
