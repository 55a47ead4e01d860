"""How the provider speaks to one container: one ``Channel`` implementation per ``protocol``.

Today the HTTP envelope (``docs/protocol.md``), sent by the HTTP provider's own code (one
``HttpProvider`` per container, over a Unix socket or a loopback port), so its error
mapping applies as is: anything the plugin answers reaches the caller as the HTTP
provider maps it. ``protocol`` is the seam for gRPC: a ``GrpcChannel`` built on the grpc
provider's client, added to ``CHANNELS``, is all a ``protocol: grpc`` target needs (plus
the Literal's new value in ``DockerTarget``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from providers.base import Health
from providers.http import HttpProvider, HttpTarget
from providers.invocation import Invocation, Outcome

__all__ = ["CHANNELS", "Address", "Channel", "HttpChannel"]


@dataclass(frozen=True, slots=True)
class Address:
    """Where one container listens: a Unix socket on the host, or a loopback port."""

    container: str  # for messages: "linchkit-echo-1a2b3c4d of echo@1.0.0 (image)"
    unix_socket: str | None = None
    port: int | None = None


class Channel(Protocol):
    """What the provider needs of a wire to one container."""

    async def open(self) -> None: ...
    async def invoke(self, invocation: Invocation) -> Any: ...
    async def invoke_batch(self, invocations: Sequence[Invocation]) -> list[Outcome[Any]]: ...
    async def health(self) -> Health: ...
    async def aclose(self) -> None: ...


class _ContainerHttpTarget(HttpTarget):
    """An HTTP target whose error messages name the container, not a made-up URL."""

    container: str

    def describe(self) -> str:
        return f"container {self.container}"


class HttpChannel:
    """Speaks the HTTP envelope to one container, through the HTTP provider's code."""

    def __init__(self, address: Address) -> None:
        if address.unix_socket is not None:
            # The host part of the URL is only a label: the connector dials the socket.
            url = "http://container"
        else:
            url = f"http://127.0.0.1:{address.port}"
        self._http = HttpProvider(unix_socket=address.unix_socket, max_connections=64)
        self._target = _ContainerHttpTarget(provider="http", url=url, container=address.container)

    async def open(self) -> None:
        await self._http.start()

    async def invoke(self, invocation: Invocation) -> Any:
        return await self._http.invoke(self._target, invocation)

    async def invoke_batch(self, invocations: Sequence[Invocation]) -> list[Outcome[Any]]:
        return await self._http.invoke_batch(self._target, invocations)

    async def health(self) -> Health:
        return await self._http.health(self._target)

    async def aclose(self) -> None:
        await self._http.aclose()


#: The channel of each ``DockerTarget.protocol``.
CHANNELS: dict[str, Callable[[Address], Channel]] = {"http": HttpChannel}
