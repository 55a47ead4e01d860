"""Subprocess plugins: an executable in any language, launched and owned by the dispatcher.

Modelled on hashicorp/go-plugin (``docs/protocol.md``, "Subprocess plugins"):

1. Before each launch, when the target pins ``sha256``, the executable's digest is checked;
   a mismatch refuses to run it (``ProviderError``).
2. The child gets the handshake environment: the magic cookie, the protocol versions the
   host speaks, the network (a Unix socket in a fresh private folder by default) and, with
   AutoMTLS, a one-time client certificate made for this launch.
3. The child prints one handshake line on stdout within ``handshake_timeout_ms``; the
   host checks the core version, that the chosen protocol version is one it offered, the
   network and the protocol, and (AutoMTLS) takes the plugin's one-time server certificate
   as the only root it trusts. Then it connects (``providers/_grpc_client.py``) and runs
   ``Init`` (the manifest's config) and ``Start``.
4. The child's stderr goes to the log line by line (logger ``dispatcher.plugin.<id>``).
5. Health pings every ``health_interval_ms``; a child that stops answering is killed.
6. A child that exits is restarted with exponential backoff; more than ``max_restarts``
   exits within ``restart_window_s`` is a crash loop: the plugin is left down and calls
   fail with ``TargetUnavailable``.
7. Stopping: ``Stop``, ``Destroy``, close stdin, SIGTERM, SIGKILL after ``stop_grace_ms``.

No child outlives the dispatcher: the child's stdin is a pipe whose write end only the
dispatcher holds (end-of-file when it dies, however it dies: plugins exit on it), and on
Linux the child is started with a parent-death signal (``PR_SET_PDEATHSIG``, SIGKILL,
set by util-linux ``setpriv`` where present, else by ``prctl`` between fork and exec).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from linchkit_plugin._automtls import der_from_handshake, generate_certificate, pem_from_der
from linchkit_plugin.errors import DeadlineExceeded, DispatchError, ProviderError, TargetUnavailable
from providers._grpc_client import ChannelSecurity, PluginConnection
from providers.base import Health, Provider
from providers.invocation import Invocation, Outcome
from providers.target import TargetConfig

if TYPE_CHECKING:
    from providers.target import PluginInfo

__all__ = ["HandshakeError", "SubprocessProvider", "SubprocessTarget"]

log = logging.getLogger("dispatcher.providers.subprocess")

MAGIC_COOKIE_KEY = "LINCHKIT_PLUGIN_MAGIC_COOKIE"
MAGIC_COOKIE_VALUE = "d1spatch3r-pl4g1n"
CORE_VERSION = "1"
#: How long a launch waits for the Events stream's headers (docs/protocol.md: plugins
#: should send them at once; those that do not cost this much per launch, no more).
_EVENTS_READY_WAIT = 0.25


class HandshakeError(ProviderError):
    """The plugin did not start as the protocol says (no line, a malformed line, a refusal)."""


class SubprocessTarget(TargetConfig):
    """``provider: subprocess``: a plugin executable the dispatcher launches and owns."""

    provider: Literal["subprocess"]
    command: list[str] = Field(
        min_length=1, description="The executable (relative to the manifest) and its arguments."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment.")
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="Refuse to run the executable unless its SHA-256 is this.",
    )
    network: Literal["unix", "tcp"] = "unix"
    auto_mtls: bool = Field(default=True, description="One-time mutual TLS per launch.")
    protocol_versions: list[int] = Field(default_factory=lambda: [1], min_length=1)
    handshake_timeout_ms: int = Field(default=10_000, gt=0)
    health_interval_ms: int = Field(default=5_000, ge=0, description="0: no health pings.")
    health_failures: int = Field(default=3, gt=0, description="Failed pings before a kill.")
    restart: bool = True
    max_restarts: int = Field(default=5, ge=0)
    restart_window_s: float = Field(default=60.0, gt=0)
    restart_backoff_ms: int = Field(default=100, gt=0)
    restart_backoff_max_ms: int = Field(default=5_000, gt=0)
    stop_grace_ms: int = Field(default=3_000, gt=0)
    events: bool = True
    batch: bool = True

    @field_validator("command")
    @classmethod
    def _executable_relative_to_manifest(
        cls, command: list[str], info: ValidationInfo
    ) -> list[str]:
        executable = command[0]
        if os.sep in executable and not os.path.isabs(executable):
            base = (info.context or {}).get("base_dir", Path.cwd())
            executable = str((Path(base) / executable).resolve())
        return [executable, *command[1:]]

    def describe(self) -> str:
        return f"subprocess {Path(self.command[0]).name}"


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _with_parent_death_signal(argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """The command and ``preexec_fn`` that make the kernel SIGKILL the child if we die.

    Preferred: util-linux ``setpriv --pdeathsig KILL`` execs the plugin with the signal set,
    so Python can spawn without running Python code between fork and exec (grpcio's threads
    make that unsafe, and it logs a warning). Without setpriv: a ``preexec_fn`` calling
    ``prctl`` resolved before the fork, which also exits if the parent is already gone.
    (A parent dying in the instant before setpriv's prctl is covered by the stdin rule.)
    """
    if not sys.platform.startswith("linux"):
        return argv, None
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "KILL", "--", *argv], None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return argv, None
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:
            os._exit(1)

    return argv, set_parent_death_signal


class _Child:
    """One launch: the process, its socket folder, its connection, its log readers."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        folder: str,
        readers: list[asyncio.Task[None]],
    ) -> None:
        self.process = process
        self.folder = folder
        self.readers = readers
        self.connection: PluginConnection | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    async def terminate(self, grace: float) -> int | None:
        """Close stdin, SIGTERM, then SIGKILL after ``grace`` seconds; reap; clean up."""
        process = self.process
        if self.connection is not None:
            # First: ending our Events stream lets the plugin's server stop without a grace wait.
            await self.connection.close()
            self.connection = None
        if process.stdin is not None:
            with contextlib.suppress(Exception):
                process.stdin.close()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                async with asyncio.timeout(grace):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for reader in self.readers:
            reader.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        if self.connection is not None:
            await self.connection.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        return process.returncode


class PluginProcess:
    """Supervises one plugin executable: launch, handshake, health, restarts, stop."""

    def __init__(
        self,
        plugin: PluginInfo,
        target: SubprocessTarget,
        *,
        event_sink: Callable[[str, Any], None] | None,
    ) -> None:
        self.plugin = plugin
        self.target = target
        self._event_sink = event_sink
        self._child: _Child | None = None
        self._ready = asyncio.Event()
        self._state: Literal["new", "running", "restarting", "failed", "stopped"] = "new"
        self._crashes: list[float] = []
        self.restarts = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._plugin_log = logging.getLogger(f"dispatcher.plugin.{plugin.id}")
        self._last_error = ""
        #: The return code of the last process stopped by ``stop`` (negative: its signal).
        self.exit_code: int | None = None

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def state(self) -> str:
        return self._state

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Launch the plugin and wait for it to be started; raise if it cannot be."""
        self._child = await self._launch()
        self._state = "running"
        self._ready.set()
        loop = asyncio.get_running_loop()
        self._supervisor = loop.create_task(self._supervise(), name=f"supervise {self.plugin.key}")
        if self.target.health_interval_ms:
            self._pinger = loop.create_task(self._ping(), name=f"health {self.plugin.key}")

    async def stop(self) -> None:
        if self._state == "stopped":
            return
        self._state = "stopped"
        self._ready.set()  # wake waiting callers: they will see "stopped"
        for task in (self._supervisor, self._pinger):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        child, self._child = self._child, None
        if child is None:
            return
        if child.connection is not None and child.process.returncode is None:
            timeout = self.plugin.lifecycle.stop_timeout_ms / 1000
            for step in ("Stop", "Destroy"):
                try:
                    await child.connection.lifecycle(step, timeout)
                except DispatchError as error:
                    log.warning("%s %s failed: %s", self.plugin.key, step, error)
        self.exit_code = await child.terminate(self.target.stop_grace_ms / 1000)

    # -- calls -------------------------------------------------------------------------------

    async def connection(self, invocation: Invocation | None = None) -> PluginConnection:
        """The live connection; while restarting, wait for it up to the call's deadline."""
        while True:
            child = self._child
            if self._state == "running" and child is not None and child.connection is not None:
                return child.connection
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

    # -- launching ---------------------------------------------------------------------------

    async def _launch(self) -> _Child:
        target = self.target
        executable = shutil.which(target.command[0]) or target.command[0]
        if target.sha256 is not None:
            try:
                actual = await asyncio.to_thread(_sha256_of, executable)
            except OSError as error:
                raise ProviderError(
                    f"{self.plugin.key}: cannot read {executable}: {error.strerror}"
                ) from None
            if actual != target.sha256.lower():
                raise ProviderError(
                    f"{self.plugin.key}: refusing to run {executable}: its SHA-256 is {actual}, "
                    f"the manifest pins {target.sha256.lower()}"
                )
        folder = tempfile.mkdtemp(prefix="lk-plugin-")
        os.chmod(folder, 0o700)
        environment = {
            **os.environ,
            **target.env,
            MAGIC_COOKIE_KEY: MAGIC_COOKIE_VALUE,
            "LINCHKIT_PLUGIN_PROTOCOL_VERSIONS": ",".join(map(str, target.protocol_versions)),
            "LINCHKIT_PLUGIN_NETWORK": target.network,
            "LINCHKIT_PLUGIN_SOCKET_DIR": folder,
        }
        client_certificate = generate_certificate("host") if target.auto_mtls else None
        if client_certificate is not None:
            environment["LINCHKIT_PLUGIN_CLIENT_CERT"] = client_certificate.certificate_pem.decode()
        else:
            environment.pop("LINCHKIT_PLUGIN_CLIENT_CERT", None)
        argv, preexec = _with_parent_death_signal([executable, *target.command[1:]])
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=environment,
                preexec_fn=preexec,
            )
        except OSError as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise ProviderError(
                f"{self.plugin.key}: cannot start {executable}: {error.strerror}"
            ) from None
        assert process.stdout is not None
        assert process.stderr is not None
        stderr_lines: list[str] = []
        readers = [
            asyncio.get_running_loop().create_task(self._forward_stderr(process, stderr_lines))
        ]
        child = _Child(process, folder, readers)
        log.info("%s launched %s (pid %d)", self.plugin.key, executable, process.pid)
        try:
            line = await self._handshake_line(process, stderr_lines)
            address, server_der = self._parse_handshake(line, client_certificate is not None)
            readers.append(asyncio.get_running_loop().create_task(self._drain_stdout(process)))
            security = ChannelSecurity()
            if client_certificate is not None and server_der is not None:
                security = ChannelSecurity(
                    tls=True,
                    root=pem_from_der(server_der),
                    private_key=client_certificate.private_key_pem,
                    certificate_chain=client_certificate.certificate_pem,
                    server_name="localhost",
                )
            connection = PluginConnection(
                address, security=security, describe=f"{self.plugin.key} (pid {process.pid})"
            )
            child.connection = connection
            init_timeout = self.plugin.lifecycle.init_timeout_ms / 1000
            await connection.wait_ready(target.handshake_timeout_ms / 1000)
            if target.events and self._event_sink is not None:
                connection.open_events(self._event_sink)
            await connection.lifecycle("Init", init_timeout, self.plugin.config)
            await connection.lifecycle("Start", init_timeout)
            if target.events and self._event_sink is not None:
                # Events emitted from now on reach the host, where the plugin says when.
                await connection.events_ready(_EVENTS_READY_WAIT)
        except BaseException:
            await child.terminate(0.5)
            raise
        return child

    async def _handshake_line(self, process: asyncio.subprocess.Process, stderr: list[str]) -> str:
        assert process.stdout is not None
        timeout = self.target.handshake_timeout_ms / 1000
        try:
            async with asyncio.timeout(timeout):
                raw = await process.stdout.readline()
        except TimeoutError:
            raise HandshakeError(
                f"{self.plugin.key}: no handshake line within {timeout:.1f} s{_tail(stderr)}"
            ) from None
        if not raw:
            code = await process.wait()
            await asyncio.sleep(0)  # let the stderr reader take the last lines
            raise HandshakeError(
                f"{self.plugin.key}: exited with code {code} before its handshake{_tail(stderr)}"
            )
        return raw.decode("utf-8", "replace").strip()

    def _parse_handshake(self, line: str, mtls: bool) -> tuple[str, bytes | None]:
        parts = line.split("|")
        if len(parts) != 6:
            raise HandshakeError(
                f"{self.plugin.key}: malformed handshake line {line!r:.200}; expected "
                "CORE-VERSION|APP-VERSION|NETWORK|ADDRESS|PROTOCOL|SERVER-CERT"
            )
        core, app, network, address, protocol, certificate = parts
        if core != CORE_VERSION:
            raise HandshakeError(
                f"{self.plugin.key}: handshake core version {core!r}; this host speaks {CORE_VERSION}"
            )
        if not app.isdigit() or int(app) not in self.target.protocol_versions:
            raise HandshakeError(
                f"{self.plugin.key}: plugin chose protocol version {app!r}, "
                f"not one of those offered ({self.target.protocol_versions})"
            )
        if protocol != "grpc":
            raise HandshakeError(f"{self.plugin.key}: protocol {protocol!r}; only grpc is spoken")
        if network == "unix":
            grpc_address = f"unix:{address}"
        elif network == "tcp" and re.fullmatch(r"[^:\s]+:\d+|\[[0-9a-fA-F:]+\]:\d+", address):
            grpc_address = address
        else:
            raise HandshakeError(f"{self.plugin.key}: bad network/address {network}|{address}")
        if not mtls:
            return grpc_address, None
        if not certificate:
            raise HandshakeError(
                f"{self.plugin.key}: AutoMTLS was asked for but the plugin sent no server "
                "certificate; it would serve in plain text"
            )
        try:
            return grpc_address, der_from_handshake(certificate)
        except ValueError as error:
            raise HandshakeError(f"{self.plugin.key}: bad server certificate: {error}") from None

    async def _forward_stderr(self, process: asyncio.subprocess.Process, tail: list[str]) -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            tail.append(line)
            del tail[:-20]
            self._plugin_log.info("%s", line)

    async def _drain_stdout(self, process: asyncio.subprocess.Process) -> None:
        # Not part of the protocol after the handshake, but a full pipe would block the child.
        assert process.stdout is not None
        async for raw in process.stdout:
            self._plugin_log.debug("stdout: %s", raw.decode("utf-8", "replace").rstrip())

    # -- supervision -------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            child = self._child
            assert child is not None
            code = await child.process.wait()
            if self._state == "stopped":
                return
            self._ready.clear()
            self._state = "restarting"
            self._last_error = f"exited with code {code}"
            log.warning("%s (pid %d) %s", self.plugin.key, child.pid, self._last_error)
            await child.terminate(0.1)
            self._child = None
            while True:
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

    async def _ping(self) -> None:
        interval = self.target.health_interval_ms / 1000
        failures = 0
        while True:
            await asyncio.sleep(interval)
            child = self._child
            if self._state != "running" or child is None or child.connection is None:
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
            f"restarts={self.restarts}>"
        )


def _tail(lines: Sequence[str]) -> str:
    return ("; its stderr ends with:\n  " + "\n  ".join(lines[-10:])) if lines else ""


class SubprocessProvider(Provider[SubprocessTarget]):
    name = "subprocess"
    target_model = SubprocessTarget
    native_batch = True

    def __init__(self) -> None:
        self._processes: dict[tuple[str, str, str], PluginProcess] = {}
        self._keys: dict[int, str] = {}

    def _key(self, target: SubprocessTarget) -> str:
        # Targets hold dicts (env), so they are not hashable; their JSON is, computed once.
        key = self._keys.get(id(target))
        if key is None:
            key = self._keys[id(target)] = target.model_dump_json()
        return key

    async def attach(self, plugin: PluginInfo, target: SubprocessTarget) -> None:
        key = (plugin.id, plugin.version, self._key(target))
        if key in self._processes:
            return
        sink = self.event_sink
        plugin_id = plugin.id
        process = PluginProcess(
            plugin,
            target,
            event_sink=(lambda event, data: sink(plugin_id, event, data)) if sink else None,
        )
        await process.start()
        self._processes[key] = process

    async def detach(self, plugin: PluginInfo, target: SubprocessTarget) -> None:
        process = self._processes.pop((plugin.id, plugin.version, self._key(target)), None)
        if process is not None:
            await process.stop()

    async def aclose(self) -> None:
        processes, self._processes = self._processes, {}
        await asyncio.gather(*(process.stop() for process in processes.values()))

    def process(self, plugin: str, version: str, target: SubprocessTarget) -> PluginProcess:
        found = self._processes.get((plugin, version, self._key(target)))
        if found is None:
            raise TargetUnavailable(f"{plugin}@{version} is not started on {target.describe()}")
        return found

    async def invoke(self, target: SubprocessTarget, invocation: Invocation) -> Any:
        process = self.process(invocation.plugin, invocation.version, target)
        connection = await process.connection(invocation)
        return await connection.call(invocation)

    async def invoke_batch(
        self, target: SubprocessTarget, invocations: Sequence[Invocation]
    ) -> list[Outcome[Any]]:
        if not target.batch or not invocations:
            return await super().invoke_batch(target, invocations)
        first = invocations[0]
        process = self.process(first.plugin, first.version, target)
        connection = await process.connection(first)
        return await connection.call_batch(invocations)

    async def stream(
        self, target: SubprocessTarget, invocation: Invocation
    ) -> AsyncGenerator[Any, None]:
        process = self.process(invocation.plugin, invocation.version, target)
        connection = await process.connection(invocation)
        async for chunk in connection.stream(invocation):
            yield chunk

    async def send_event(self, target: SubprocessTarget, event: str, data: Any) -> None:
        for (_, _, key), process in self._processes.items():
            if key == self._key(target):
                (await process.connection()).send_event(event, data)

    async def health(self, target: SubprocessTarget) -> Health:
        key = self._key(target)
        found = [process for (_, _, k), process in self._processes.items() if k == key]
        if not found:
            return Health("not_serving", "not started")
        reports = [await process.health() for process in found]
        return next((report for report in reports if not report.ok), reports[0])

    def __repr__(self) -> str:
        return f"<SubprocessProvider 'subprocess' processes={list(self._processes.values())}>"
