"""How many connections a grpc server holds open, read from grpc's channelz: the gRPC
port's part of the gateway's connection metrics (``ConnectionsCollector``)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc.aio
import orjson
from grpc._cython import cygrpc  # channelz's reads: grpcio's public channelz is a servicer

__all__ = ["OpenConnections"]

log = logging.getLogger("dispatcher.gateway")


class OpenConnections:
    """The connections open on one grpc server, as its channelz node lists them.

    channelz keeps a node per server, made with it, and one per connection from its
    accept to its close (before its HTTP/2 preface too), on by default
    (``grpc.enable_channelz``). The server's node is found as the one that appeared while
    ``make`` made the server. grpcio exposes channelz's reads only in its private
    ``cygrpc`` (the ``grpcio-channelz`` package serves them as a gRPC service); a read
    that fails (a grpcio without them, channelz off) counts nothing: None.
    """

    #: Sockets one channelz read lists at most (grpc's page size).
    _PAGE = 100

    def __init__(self, make: Callable[[], grpc.aio.Server]) -> None:
        before = self._servers()
        self.server = make()
        after = self._servers()
        appeared = after - before if before is not None and after is not None else set()
        self._id = appeared.pop() if len(appeared) == 1 else None
        if self._id is None:
            log.debug(
                "grpc's channelz shows no new server: the gRPC port's connections go uncounted"
            )

    @staticmethod
    def _servers() -> set[int] | None:
        try:
            page = orjson.loads(cygrpc.channelz_get_servers(0))
            return {int(server["ref"]["serverId"]) for server in page.get("server", ())}
        except Exception:  # grpc's private API: anything is possible, nothing is counted
            return None

    def count(self) -> int | None:
        """Connections open now, or None when channelz cannot tell."""
        if self._id is None:
            return None
        count, start = 0, 0
        try:
            while True:
                page = orjson.loads(cygrpc.channelz_get_server_sockets(self._id, start, self._PAGE))
                sockets = page.get("socketRef", ())
                count += len(sockets)
                if page.get("end", True) or not sockets:
                    return count
                start = max(int(socket["socketId"]) for socket in sockets) + 1
        except Exception:
            return None
