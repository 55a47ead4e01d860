"""The hosts attached to a plugin service at once (docs/protocol.md, "Several hosts on one
service"): the replicas of a dispatcher, or one dispatcher and the next in a rolling
restart. Each names itself with the ``linchkit-host`` metadata on lifecycle RPCs; the
plugin's ``stop`` and ``destroy`` hooks run only when the last of them leaves, so no host's
``Stop`` runs under another's calls. RPCs without it count as one host whose id is empty.
"""

from __future__ import annotations

import re
from collections import Counter
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
    """Hosts whose ``Init`` succeeded and that have not sent ``Stop`` or ``Destroy`` since.

    A host whose ``Init`` is running holds a place already: Inits of new hosts arriving
    together cannot push the set past ``MAX_HOSTS``."""

    __slots__ = ("_hosts", "_joining")

    def __init__(self) -> None:
        self._hosts: set[str] = set()
        self._joining: Counter[str] = Counter()

    def join(self, host: str) -> bool:
        """Hold a place for ``host`` while its ``Init`` runs; False when there is none.
        Every True is followed by one ``joined``."""
        places = self._hosts | self._joining.keys()
        if host not in places and len(places) >= MAX_HOSTS:
            return False
        self._joining[host] += 1
        return True

    def joined(self, host: str, succeeded: bool) -> None:
        """The end of ``host``'s ``Init``: attached when it succeeded."""
        self._joining[host] -= 1
        if self._joining[host] <= 0:
            del self._joining[host]
        if succeeded:
            self._hosts.add(host)

    def others_stay(self, leaving: str) -> bool:
        """Take ``leaving`` out; whether another host is still attached (then its
        ``Stop``/``Destroy`` runs no hook)."""
        self._hosts.discard(leaving)
        return bool(self._hosts)

    def __len__(self) -> int:
        return len(self._hosts)
