"""How the provider speaks to one container: one ``Channel`` implementation per ``protocol``.

Today the HTTP envelope (``docs/protocol.md``), sent by the HTTP provider's own code (one
``HttpProvider`` per container, over a Unix socket or a loopback port), so its error
mapping applies as is: anything the plugin answers reaches the caller as the HTTP
provider maps it. ``protocol`` is the seam for gRPC: a ``GrpcChannel`` built on the grpc
provider's client, added to ``CHANNELS``, is all a ``protocol: grpc`` target needs (plus
the Literal's new value in ``DockerTarget``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from linchkit_plugin.errors import TargetUnavailable
from providers._socket_pin import PinnedSocket, SocketTampered
from providers.base import CONNECT_STAGE, Health
from providers.docker.port_owner import DIALLED_HOST, PortOwner, PortTaken, can_check_owners
from providers.http import HttpProvider, HttpTarget
from providers.invocation import Invocation, Outcome
from providers.target import PluginInfo

__all__ = ["CHANNELS", "Address", "Channel", "HttpChannel"]

log = logging.getLogger("dispatcher.providers.docker")

_T = TypeVar("_T")

#: Seconds between looks at connections waiting to be accepted: the first soon (an accept
#: takes well under a millisecond), doubling while they wait, up to the last.
_FIRST_LOOK = 0.0005
_LAST_LOOK = 0.02


@dataclass(frozen=True, slots=True)
class Address:
    """Where one container listens: a Unix socket on the host, or a loopback port."""

    container: str  # for messages: "linchkit-echo-1a2b3c4d of echo@1.0.0 (image)"
    unix_socket: str | None = None
    port: int | None = None
    #: The bearer token this container's plugin server was started with (``LINCHKIT_PLUGIN_TOKEN``).
    token: str | None = None
    #: The container's first process (``State.Pid``): who must hold ``port``.
    container_pid: int | None = None


class Channel(Protocol):
    """What the provider needs of a wire to one container."""

    async def open(self) -> None: ...
    async def invoke(self, invocation: Invocation) -> Any: ...
    async def invoke_batch(self, invocations: Sequence[Invocation]) -> list[Outcome[Any]]: ...
    async def health(self) -> Health: ...
    async def served_methods(self, plugin: PluginInfo, timeout: float) -> frozenset[str] | None: ...
    async def aclose(self) -> None: ...


class _ContainerHttpTarget(HttpTarget):
    """An HTTP target whose error messages name the container, not a made-up URL."""

    container: str

    def describe(self) -> str:
        return f"container {self.container}"


class HttpChannel:
    """Speaks the HTTP envelope to one container, through the HTTP provider's code.

    Over a Unix socket, the host only ever connects to the socket the plugin created in
    its folder (``PinnedSocket``): never through a symlink or to another file the plugin
    put in its place. Over a loopback port, the host opens no connection there unless the
    container's own processes alone listen on it (``PortOwner``: checked again at each
    health probe, and before each new connection) and sends nothing on a connection that
    a process outside the container accepted, where this process may look (as root).
    """

    def __init__(self, address: Address) -> None:
        self._address = address
        self._pin: PinnedSocket | None = None
        self._owner: PortOwner | None = None
        self._taken: PortTaken | None = None
        self._http: HttpProvider | None = None
        #: Connections opened to the port and not yet found accepted by the container.
        self._awaiting_accept: dict[tuple[Any, ...], asyncio.Future[None]] = {}
        self._arrived = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        #: The one thread the port's checks run on (``_off_loop``); started at the first.
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="linchkit-port-check")
        if address.unix_socket is not None:
            # The host part of the URL is only a label: the connector dials the socket.
            url = "http://container"
            self._pin = PinnedSocket(
                address.unix_socket,
                f"container {address.container}",
                log,
                "refuses every call to this container",
            )
        else:
            url = f"http://{DIALLED_HOST}:{address.port}"
            if address.port is not None and can_check_owners():
                # No pid (the container stopped as it started): no process passes the check.
                self._owner = PortOwner(
                    address.port, address.container_pid or 0, f"container {address.container}"
                )
            # Every new connection of the pool is checked, not only the first: the port may
            # change hands while the container runs (its server reloading, or dying).
            self._http = HttpProvider(
                max_connections=64, connection_check=None if self._owner is None else self
            )
        self._target = _ContainerHttpTarget(
            provider="http", url=url, container=address.container, bearer_token=address.token
        )

    async def open(self) -> None:
        if self._http is not None:
            await self._http.start()

    async def _client(self) -> HttpProvider:
        """The HTTP client; over a Unix socket, once the socket is pinned, and only while
        the folder still holds it."""
        pin = self._pin
        if pin is None:
            assert self._http is not None
            if self._taken is not None:
                raise self._taken
            return self._http
        if self._http is None:
            path = pin.pin()  # SocketTampered, or FileNotFoundError until the plugin listens
            http = HttpProvider(unix_socket=path, max_connections=64)
            await http.start()
            self._http = http
        pin.check()
        return self._http

    async def before_connect(self) -> None:
        """Before the HTTP client opens a connection to the port (``ConnectionCheck``): its
        listeners are the ones last found to be the container's alone, or they are checked
        again."""
        assert self._owner is not None
        try:
            if self._taken is not None:
                raise self._taken
            if not await self._off_loop(self._owner.unchanged):
                await self._check_owner()
        except (PortTaken, FileNotFoundError) as error:
            raise self._refused(error) from None

    async def connected(self, local: tuple[Any, ...] | None) -> None:
        """The HTTP client opened a connection to the port, nothing sent on it yet
        (``ConnectionCheck``): it waits until the connection is accepted and requires the
        container's processes to hold its other end (``PortOwner.accepted_all``). A process
        outside the container that took the port since ``before_connect`` is refused for
        good, as at a probe. The wait is the call's: its timeout ends it."""
        try:
            if local is None:
                raise ConnectionResetError("the connection closed before it was checked")
            waiter = asyncio.get_running_loop().create_future()
            self._awaiting_accept[local] = waiter
            self._arrived.set()
            if self._watch is None or self._watch.done():
                self._watch = asyncio.create_task(self._watch_accepts())
            try:
                await waiter
            finally:
                del self._awaiting_accept[local]
        except PortTaken as error:
            raise self._refused(self._incident(error)) from None
        except ConnectionResetError as error:
            raise TargetUnavailable(
                f"container {self._address.container}: {error}", details=CONNECT_STAGE
            ) from None
        except (OSError, RuntimeError) as error:
            # The tables could not be read (or the channel closed under the wait): nothing
            # was sent, and the caller gets the provider's error, not the reader's.
            raise TargetUnavailable(
                f"container {self._address.container}: cannot check who accepted the"
                f" connection to its port: {error}",
                details=CONNECT_STAGE,
            ) from None

    async def _watch_accepts(self) -> None:
        """Looks at every connection waiting to be accepted, all at once, until none is
        left: soon after one arrives, then less often while they wait (a busy worker may
        take a while to take what its server accepted for it)."""
        owner = self._owner
        assert owner is not None
        waiting = self._awaiting_accept
        pause = _FIRST_LOOK
        while ends := [end for end, waiter in waiting.items() if not waiter.done()]:
            self._arrived.clear()
            outcomes: dict[tuple[Any, ...], bool | Exception]
            try:
                outcomes = dict(await self._off_loop(owner.accepted_all, ends))
            except Exception as error:  # the reads failed: so do the waits
                outcomes = dict.fromkeys(ends, error)
            for end, outcome in outcomes.items():
                waiter = waiting.get(end)
                if waiter is None or waiter.done() or outcome is False:
                    continue
                if outcome is True:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(outcome)
            try:
                async with asyncio.timeout(pause):
                    await self._arrived.wait()
                pause = _FIRST_LOOK  # a new connection: look soon
            except TimeoutError:
                pause = min(pause * 2, _LAST_LOOK)

    def _off_loop(self, read: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """``read`` on the channel's own thread: reading every process's descriptors may
        take seconds, and neither blocks the event loop nor fills its default executor
        (where aiohttp resolves host names, for every target of the process), and the
        channel's reads of the tables go one at a time."""
        return asyncio.get_running_loop().run_in_executor(self._reads, read, *args)

    async def _check_owner(self) -> None:
        """``PortOwner.check``, off the event loop (it reads every process's descriptors):
        ``FileNotFoundError`` while nothing listens yet; once a process outside the
        container held the port, ``PortTaken`` for good (logged once: a local process
        waited for this container's calls and token)."""
        assert self._owner is not None
        if self._taken is not None:
            raise self._taken
        try:
            listening = await self._off_loop(self._owner.check)
        except PortTaken as error:
            raise self._incident(error) from None
        if not listening:
            raise FileNotFoundError(f"nothing listens on port {self._owner.port} yet")

    def _incident(self, error: PortTaken) -> PortTaken:
        """The port was found in other hands: every later call is refused with the first
        such finding, logged once (checks of connections opened together find it alike)."""
        if self._taken is None:
            self._taken = error
            log.error("security: %s; its calls and token are not sent there", error)
        return self._taken

    async def invoke(self, invocation: Invocation) -> Any:
        try:
            http = await self._client()
        except (SocketTampered, PortTaken, FileNotFoundError) as error:
            raise self._refused(error) from None
        return await http.invoke(self._target, invocation)

    async def invoke_batch(self, invocations: Sequence[Invocation]) -> list[Outcome[Any]]:
        try:
            http = await self._client()
        except (SocketTampered, PortTaken, FileNotFoundError) as error:
            raise self._refused(error) from None
        return await http.invoke_batch(self._target, invocations)

    def _refused(self, error: OSError) -> TargetUnavailable:
        container = self._address.container
        if isinstance(error, SocketTampered):
            return TargetUnavailable(
                f"container {container} {error}; refusing to call it",
                retryable=False,
                details={"container": container, "socket_tampered": True},
            )
        if isinstance(error, PortTaken):
            return TargetUnavailable(
                f"{error}; refusing to call it",
                retryable=False,
                details={"container": container, "port_taken": True},
            )
        if self._owner is not None:
            return TargetUnavailable(f"container {container} does not listen on its port yet")
        return TargetUnavailable(f"container {container} has no socket yet")

    async def health(self) -> Health:
        try:
            if self._owner is not None:
                await self._check_owner()  # at every probe: whoever listens now
            http = await self._client()
        except (SocketTampered, PortTaken) as error:
            return Health("not_serving", f"refused: {error}")
        except FileNotFoundError:
            return Health("not_serving", "the plugin does not listen yet")
        return await http.health(self._target)

    async def served_methods(self, plugin: PluginInfo, timeout: float) -> frozenset[str] | None:
        """The container's ``GET /describe``; None before its socket is there."""
        try:
            http = await self._client()
        except (SocketTampered, PortTaken, FileNotFoundError):
            return None
        return await http.served_methods(plugin, self._target, timeout=timeout)

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        self._reads.shutdown(wait=False, cancel_futures=True)
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()
        if self._pin is not None:
            self._pin.close()


#: The channel of each ``DockerTarget.protocol``.
CHANNELS: dict[str, Callable[[Address], Channel]] = {"http": HttpChannel}
