"""``PluginProcess``: supervises one plugin executable — launch, handshake, ``Init`` and
``Start``, health pings, restarts with backoff, and the stop sequence (steps 1-7 of
``providers.subprocess``).

A child that exits is restarted with exponential backoff (``restart_backoff_ms`` doubling
up to ``restart_backoff_max_ms``); more than ``max_restarts`` exits within
``restart_window_s`` is a crash loop: the plugin is left ``failed`` and calls fail with
``TargetUnavailable(retryable=False)``. Calls made while it restarts wait for it until
their deadline. A child that fails ``health_failures`` pings in a row is killed (and so
restarted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from linchkit_plugin._automtls import generate_certificate, pem_from_der
from linchkit_plugin.errors import DeadlineExceeded, DispatchError, TargetUnavailable
from providers._grpc import lifecycle
from providers._grpc.channel import ChannelSecurity
from providers._grpc.connection import PluginConnection
from providers._socket_pin import SocketTampered
from providers.base import CONNECT_STAGE, Health
from providers.subprocess import handshake
from providers.subprocess.child import Child, check_digests, socket_folder, spawn
from providers.subprocess.output import OutputRing
from providers.subprocess.sandbox import SandboxedLaunch, needs_own_uid, sandboxed_launch
from providers.subprocess.uids import UidClaim, UidUnavailable, claim_uid

if TYPE_CHECKING:
    from providers.capabilities import Translation
    from providers.invocation import Invocation
    from providers.subprocess.target import SubprocessSandbox, SubprocessTarget
    from providers.target import PluginInfo

__all__ = ["PluginProcess"]

log = logging.getLogger("dispatcher.providers.subprocess")

T = TypeVar("T")


class PluginProcess:
    """Supervises one plugin executable: launch, handshake, health, restarts, stop."""

    def __init__(
        self,
        plugin: PluginInfo,
        target: SubprocessTarget,
        *,
        event_sink: Callable[[str, Any], None] | None,
        report_served: Callable[[frozenset[str] | None], None] | None = None,
    ) -> None:
        """``report_served``: told, after each launch, what the plugin's ``Describe``
        listed (None: it listed nothing)."""
        self.plugin = plugin
        self.target = target
        self._event_sink = event_sink
        self._report_served = report_served
        self._child: Child | None = None
        #: The running child whose connection was lost under a call: it may be exiting.
        self._dying: Child | None = None
        #: Every child launched and not yet terminated (``stop`` ends them all).
        self._children: set[Child] = set()
        self._ready = asyncio.Event()
        self._state: Literal["new", "running", "restarting", "failed", "stopped"] = "new"
        self._crashes: list[float] = []
        self.restarts = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._plugin_log = logging.getLogger(f"dispatcher.plugin.{plugin.id}")
        #: The last lines of stderr of every launch, for ``logs`` (bounded: see OutputRing).
        self.output = OutputRing()
        self._last_error = ""
        #: The return code of the last process stopped by ``stop`` (negative: its signal).
        self.exit_code: int | None = None
        #: What the sandbox of the last launch enforces (None: not sandboxed, or not launched).
        self.translation: Translation | None = None
        #: The uid claimed for the plugin's sandbox (``needs_own_uid``): the same across its
        #: restarts (files it wrote in a granted folder stay its own), released by ``stop``.
        self._uid: UidClaim | None = None

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def state(self) -> str:
        return self._state

    def _stopped(self) -> bool:
        """Whether ``stop`` has begun (a method: an await may change the state under us)."""
        return self._state == "stopped"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Launch the plugin and wait for it to be started; raise if it cannot be."""
        try:
            self._child = await self._launch()
        except BaseException:
            self._release_uid()  # no stop follows a start that failed
            raise
        self._state = "running"
        self._ready.set()
        loop = asyncio.get_running_loop()
        self._supervisor = loop.create_task(self._supervise(), name=f"supervise {self.plugin.key}")
        if self.target.health_interval_ms:
            self._pinger = loop.create_task(self._ping(), name=f"health {self.plugin.key}")

    async def stop(self) -> None:
        """Stop the plugin within ``stop_grace_ms``, always: ``Stop``, ``Destroy``, stdin
        closed, SIGTERM, and SIGKILL for whatever still runs when the grace is over,
        including a child a restart was launching at that moment."""
        if self._state == "stopped":
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.target.stop_grace_ms / 1000
        self._state = "stopped"
        self._ready.set()  # wake waiting callers: they will see "stopped"
        tasks = [task for task in (self._supervisor, self._pinger) if task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            # Never an unbounded ``await task``: a task that does not end on cancellation
            # (some library swallowing it) must not hold the dispatcher's close.
            await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        child, self._child = self._child, None
        if child is not None and child.connection is not None and child.process.returncode is None:
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await lifecycle.end(child.connection, self.plugin)
            except TimeoutError:
                log.warning(
                    "%s did not finish Stop and Destroy within stop_grace_ms", self.plugin.key
                )
        ending = [each for each in self._children if each is not child]
        if child is not None:
            ending.insert(0, child)
        remaining = max(0.0, deadline - loop.time())
        codes = await asyncio.gather(*(each.terminate(remaining) for each in ending))
        if child is not None:
            self.exit_code = codes[0]
        self._release_uid()
        pending = [task for task in tasks if not task.done()]
        if pending:
            log.warning("%s: %s did not end when cancelled", self.plugin.key, pending)
            for task in pending:
                task.cancel()

    # -- calls -------------------------------------------------------------------------------

    async def call(
        self, invocation: Invocation, make: Callable[[PluginConnection], Awaitable[T]]
    ) -> T:
        """``make(connection)`` on the live connection. One the connection refused because
        its process had just died (the socket gone before the exit was seen; nothing was
        sent) is made once more, on the next process, within the call's deadline."""
        child = await self._live_child(invocation)
        connection = child.connection
        assert connection is not None
        try:
            return await make(connection)
        except TargetUnavailable as error:
            self._kill_if_tampered(child)  # what broke the connection, perhaps
            if error.details != CONNECT_STAGE:
                # It may have reached the plugin: not made again. But its connection went
                # with it: the calls after it wait to see whether the process is exiting.
                if connection.broke_under_a_call():
                    self._dying = child
                raise
            if not await _exits(child, invocation, self.target.stop_grace_ms / 1000):
                raise
        log.info("%s: a call refused by the exiting process goes to the next one", self.plugin.key)
        return await make(await self.connection(invocation))

    async def connection(self, invocation: Invocation | None = None) -> PluginConnection:
        """The live connection; while restarting, wait for it up to the call's deadline."""
        connection = (await self._live_child(invocation)).connection
        assert connection is not None
        return connection

    async def _live_child(self, invocation: Invocation | None) -> Child:
        while True:
            child = self._child
            if self._state == "running" and child is not None and child.connection is not None:
                if child.exited.is_set():
                    # Seen exiting, and the supervisor has not run since to say it is
                    # restarting: let it, rather than call into the dead process.
                    await asyncio.sleep(0)
                    continue
                if child is not self._dying or not await self._exits_soon(child, invocation):
                    return child
                continue
            if self._state in {"failed", "stopped", "new"}:
                raise TargetUnavailable(
                    f"{self.plugin.key} ({self.target.describe()}) is {self._state}"
                    + (f": {self._last_error}" if self._last_error else ""),
                    retryable=self._state != "failed",
                )
            remaining = invocation.remaining() if invocation is not None else 5.0
            if remaining <= 0:
                raise DeadlineExceeded(f"{self.plugin.key} was restarting until the deadline")
            try:
                async with asyncio.timeout(remaining):
                    await self._ready.wait()
            except TimeoutError:
                raise DeadlineExceeded(
                    f"{self.plugin.key} was restarting until the deadline"
                ) from None

    async def _exits_soon(self, child: Child, invocation: Invocation | None) -> bool:
        """Whether ``child``, whose connection was lost under a call, is seen exiting
        within the stop grace (and the call's deadline).

        When a plugin dies, its socket closes a few ms before the process is seen exiting
        (4-65 ms here): a call made in between went into the dead connection and failed
        ("Stream removed (sendmsg: Broken pipe)"), where it should wait for the next
        process, as calls made during a restart do. A connection lost to a process that
        goes on (it is not seen exiting) is used again: grpc connects anew."""
        grace = self.target.stop_grace_ms / 1000
        if invocation is not None:
            grace = min(grace, invocation.remaining())
        try:
            async with asyncio.timeout(max(grace, 0.0)):
                await child.exited.wait()
        except TimeoutError:
            if self._dying is child:
                self._dying = None
            return False
        return True

    # -- launching ---------------------------------------------------------------------------

    async def _launch(self) -> Child:
        target, who = self.target, self.plugin.key
        executable = shutil.which(target.command[0]) or target.command[0]
        if target.sha256 is not None:
            pins = {executable: target.sha256} if isinstance(target.sha256, str) else target.sha256
            await check_digests(who, pins)
        folder = socket_folder()
        client_certificate = generate_certificate("host") if target.auto_mtls else None
        if self._stopped():
            # Stopped while the digest was checked: this launch is cancelled, like the
            # supervisor task that runs it.
            shutil.rmtree(folder, ignore_errors=True)
            raise asyncio.CancelledError
        argv = [executable, *target.command[1:]]
        environment = handshake.environment(target, folder, client_certificate)
        launch = None
        if target.sandbox is not None:
            launch = self._sandboxed(argv, target.sandbox, folder, environment)
            argv = launch.argv
        try:
            child = await spawn(
                who,
                argv,
                environment,
                folder,
                self._plugin_log,
                self.output,
                pass_fds=launch.pass_fds if launch is not None else (),
                max_lines_per_second=target.max_log_lines_per_second,
            )
        finally:
            if launch is not None:
                launch.close()
        self._children.add(child)
        child.on_end(self._children.discard)
        log.info("%s launched %s (pid %d)", who, executable, child.pid)
        try:
            timeout = target.handshake_timeout_ms / 1000
            line = await handshake.read_line(
                child.process, who, timeout, child.stderr_tail, child.reaped
            )
            address, server_der = handshake.parse(
                line,
                who,
                target.protocol_versions,
                mtls=client_certificate is not None,
                network=target.network,
                socket_folder=folder,
            )
            address, child.socket_pin = handshake.pin_socket(who, child.pid, address, log)
            child.drain_stdout()
            security = ChannelSecurity()
            if client_certificate is not None and server_der is not None:
                security = ChannelSecurity(
                    tls=True,
                    root=pem_from_der(server_der),
                    private_key=client_certificate.private_key_pem,
                    certificate_chain=client_certificate.certificate_pem,
                    server_name="localhost",
                )
            child.connection = PluginConnection(
                address,
                security=security,
                describe=f"{who} (pid {child.pid})",
                max_events_per_second=target.max_events_per_second,
            )
            await lifecycle.begin(
                child.connection,
                self.plugin,
                ready_timeout=timeout,
                event_sink=self._event_sink if target.events else None,
            )
        except BaseException:
            await child.terminate(0.5)
            raise
        if self._stopped():  # a stop that arrived while this launch ran
            await child.terminate(0.5)
            raise asyncio.CancelledError
        if self._report_served is not None:
            self._report_served(child.connection.served)
        return child

    def _sandboxed(
        self,
        argv: list[str],
        sandbox: SubprocessSandbox,
        folder: str,
        environment: dict[str, str],
    ) -> SandboxedLaunch:
        capabilities = self.plugin.capabilities
        failure = None
        if self._uid is None and needs_own_uid(sandbox):
            try:
                self._uid = claim_uid(self.plugin.id)
            except UidUnavailable as error:
                failure = error.strerror  # reported below, as the sandbox's unenforced
        launch = sandboxed_launch(
            argv,
            sandbox,
            capabilities,
            folder,
            own_uid=self._uid.uid if self._uid is not None else None,
            own_uid_failure=failure,
        )
        for name in capabilities.env:
            if name in os.environ:
                environment[name] = os.environ[name]
        if launch.run_as is not None:
            # The plugin's user must create its socket in the folder, and only it and we.
            os.chown(folder, *launch.run_as)
        told = self.translation.unenforced if self.translation is not None else []
        for line in launch.translation.unenforced:
            if line not in told:  # at the first launch, and when a restart's differs
                log.warning("%s sandbox: %s", self.plugin.key, line)
        self.translation = launch.translation
        return launch

    def _release_uid(self) -> None:
        uid, self._uid = self._uid, None
        if uid is not None:
            uid.release()

    # -- supervision -------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            child = self._child
            assert child is not None
            await child.exited.wait()
            if self._stopped():
                return
            # Restarting from the moment the exit is seen: calls made from now on wait
            # for the next process instead of going to the dead one's socket.
            self._ready.clear()
            self._state = "restarting"
            code = await child.reaped()
            if self._stopped():
                return
            self._last_error = f"exited with code {code}"
            log.warning("%s (pid %d) %s", self.plugin.key, child.pid, self._last_error)
            await child.terminate(0.1)
            self._child = None
            while not self._stopped():
                if not self._may_restart():
                    self._state = "failed"
                    self._ready.set()
                    log.error(
                        "%s crashed %d times within %.0f s; not restarting it again",
                        self.plugin.key,
                        len(self._crashes),
                        self.target.restart_window_s,
                    )
                    return
                await asyncio.sleep(self._backoff())
                if self._stopped():
                    break
                try:
                    self._child = await self._launch()
                except DispatchError as error:
                    self._last_error = str(error)
                    log.warning("restarting %s failed: %s", self.plugin.key, error)
                    continue
                self.restarts += 1
                self._state = "running"
                self._ready.set()
                break
            if self._stopped():
                return

    def _may_restart(self) -> bool:
        if not self.target.restart:
            return False
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < self.target.restart_window_s]
        self._crashes.append(now)
        return len(self._crashes) <= self.target.max_restarts

    def _backoff(self) -> float:
        exponent = max(0, len(self._crashes) - 1)
        delay = self.target.restart_backoff_ms * 2**exponent
        return float(min(delay, self.target.restart_backoff_max_ms)) / 1000

    def _kill_if_tampered(self, child: Child) -> bool:
        """Kill ``child`` if its plugin has put something else at its socket's name (the
        pin logs the incident once), and say so. The host never dials it there
        (``handshake.pin_socket``), but a plugin that tries is hostile: it is restarted as
        ``restart`` says, into a folder of its own, pinned anew."""
        if child.socket_pin is None:
            return False
        try:
            child.socket_pin.check()
        except SocketTampered as incident:
            self._last_error = str(incident)
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()
            return True
        return False

    async def _ping(self) -> None:
        interval = self.target.health_interval_ms / 1000
        failures = 0
        while True:
            await asyncio.sleep(interval)
            child = self._child
            if self._state != "running" or child is None or child.connection is None:
                failures = 0
                continue
            if self._kill_if_tampered(child):
                failures = 0
                continue
            health = await child.connection.health(timeout=min(interval, 2.0))
            failures = 0 if health.ok else failures + 1
            if failures >= self.target.health_failures and child.process.returncode is None:
                log.warning(
                    "%s (pid %d) failed %d health pings (%s); killing it",
                    self.plugin.key,
                    child.pid,
                    failures,
                    health.detail,
                )
                failures = 0
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()

    async def logs(self, *, follow: bool, lines: int) -> AsyncIterator[str]:
        """The child's last ``lines`` lines of stderr (across restarts), then, with
        ``follow``, each new one until the caller stops iterating."""
        if not follow:
            for line in self.output.last(lines):
                yield line
            return
        async for line in self.output.follow(lines):
            yield line

    @property
    def served(self) -> frozenset[str] | None:
        """What the running launch's ``Describe`` listed; None while none runs."""
        child = self._child
        if self._state != "running" or child is None or child.connection is None:
            return None
        return child.connection.served

    async def health(self) -> Health:
        child = self._child
        extra = {"pid": self.pid, "restarts": self.restarts, "state": self._state}
        if self._state != "running" or child is None or child.connection is None:
            return Health("not_serving", f"{self._state} {self._last_error}".strip(), extra=extra)
        health = await child.connection.health()
        return Health(health.status, health.detail, health.latency_ms, extra)

    def __repr__(self) -> str:
        return (
            f"<PluginProcess {self.plugin.key} {self._state} pid={self.pid} "
            f"restarts={self.restarts} output={len(self.output)} lines"
            + (f" uid={self._uid.uid}" if self._uid is not None else "")
            + ">"
        )


async def _exits(child: Child, invocation: Invocation, grace: float) -> bool:
    """Whether ``child`` is seen exiting within ``grace`` seconds (and the call's deadline).

    A refusal that never reached the plugin (nothing listens on its socket, or it answered
    "not run") is of a process going away: stopping by itself (a SIGTERM not ours), or
    killed (its socket closes a few ms before the kernel has ended it: 4-65 ms here). It
    is given the stop grace the manifest gives it; a process that still runs after that
    refuses calls for reasons of its own."""
    try:
        async with asyncio.timeout(min(invocation.remaining(), grace)):
            await child.exited.wait()
    except TimeoutError:
        return False
    return True
