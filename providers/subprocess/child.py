"""One launch of a plugin executable: the digest check, the spawn under a parent-death
signal, the child's output, and its end (close stdin, SIGTERM, SIGKILL after a grace).

No child outlives the dispatcher: its stdin is a pipe whose write end only the dispatcher
holds (end-of-file when it dies, however it dies: plugins exit on it), and on Linux it is
started with a parent-death signal (``with_parent_death_signal``).

Nor does what a child starts outlive the child: it runs in a session and process group of
its own, and once it has exited, whatever it left in that group (a worker, a shell's
background job) is killed. Those inherited its stdout and stderr: alive, they kept our
pipes open, and asyncio's ``process.wait()``, which waits for every pipe to end, never
returned, so a crashed plugin was never restarted and a stop waited out its grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping

from linchkit_plugin.errors import ProviderError
from providers._fork_safety import note_late_grpc
from providers._grpc.connection import PluginConnection
from providers._log_lines import printable
from providers._socket_pin import PinnedSocket
from providers.subprocess.levels import line_level
from providers.subprocess.output import OutputRing
from providers.subprocess.output_rate import DEFAULT_MAX_LOG_LINES_PER_SECOND, OutputRate

__all__ = [
    "MAX_LINE_BYTES",
    "Child",
    "check_digests",
    "socket_folder",
    "spawn",
    "with_parent_death_signal",
]

#: The longest line read whole from a plugin's stdout or stderr (the handshake line is ~1
#: KB). A longer stderr line is logged in pieces of this size; stdout is read as it comes.
MAX_LINE_BYTES = 64 * 1024

#: How long a child's output may go on once it has exited: what its pipes still hold.
#: Past it the pipes are closed, which a descendant that left the child's process group
#: (``setsid``), and so was not killed with it, would otherwise hold open for its life.
OUTPUT_AFTER_EXIT_SECONDS = 1.0

#: Where the kernel has no pidfd, how often the exit is looked for.
_EXIT_POLL_SECONDS = 0.05


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


async def check_digests(who: str, pins: Mapping[str, str]) -> None:
    """Refuse (``ProviderError``) to start unless every file of ``pins`` has its SHA-256.

    All files are read before anything starts; the message names each one that differs.
    """

    def mismatches() -> list[str]:
        found = []
        for path, expected in pins.items():
            try:
                actual = _sha256_of(path)
            except OSError as error:
                found.append(f"cannot read {path}: {error.strerror}")
                continue
            if actual != expected.lower():
                found.append(
                    f"{path}: its SHA-256 is {actual}, the manifest pins {expected.lower()}"
                )
        return found

    wrong = await asyncio.to_thread(mismatches)
    if wrong:
        raise ProviderError(
            f"{who}: refusing to start: " + "; ".join(wrong) + " (update the pin in the "
            "manifest's sha256 if the change is yours)"
        )


def with_parent_death_signal(argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
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


def socket_folder() -> str:
    """A fresh folder only we can enter, for the child's Unix socket."""
    folder = tempfile.mkdtemp(prefix="lk-plugin-")
    os.chmod(folder, 0o700)
    return folder


async def spawn(
    who: str,
    argv: list[str],
    environment: Mapping[str, str],
    folder: str,
    plugin_log: logging.Logger,
    output: OutputRing | None = None,
    pass_fds: tuple[int, ...] = (),
    max_lines_per_second: float = DEFAULT_MAX_LOG_LINES_PER_SECOND,
) -> Child:
    """Start ``argv`` with pipes for stdin, stdout and stderr; ``ProviderError`` if it cannot.

    Its stderr lines go to ``plugin_log`` and, when given, into ``output``, at most
    ``max_lines_per_second`` of them (``OutputRate``); ``pass_fds`` stay open in the child
    (a sandbox's seccomp program)."""
    unrunnable = _unrunnable(argv[0], environment)
    if unrunnable is not None:
        shutil.rmtree(folder, ignore_errors=True)
        raise ProviderError(f"{who}: cannot start {argv[0]}: {unrunnable}")
    command, preexec = with_parent_death_signal(argv)
    note_late_grpc(logging.getLogger("dispatcher.providers"))
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(environment),
            preexec_fn=preexec,
            pass_fds=pass_fds,
            limit=MAX_LINE_BYTES,
            # A session of its own: a terminal's Ctrl-C (SIGINT to the foreground process
            # group) reaches the dispatcher, which stops the plugin in order (Stop, then
            # SIGTERM), not the plugin first, which left every Stop and Destroy failing.
            start_new_session=True,
        )
    except OSError as error:
        shutil.rmtree(folder, ignore_errors=True)
        raise ProviderError(f"{who}: cannot start {argv[0]}: {error.strerror}") from None
    rate = OutputRate(max_lines_per_second, f"{who} (pid {process.pid})", plugin_log)
    return Child(process, folder, plugin_log, output, rate)


def _unrunnable(program: str, environment: Mapping[str, str]) -> str | None:
    """Why ``program`` cannot be run, said before spawning: behind ``setpriv`` a missing
    file was "exited with code 127 ... setpriv: failed to execute"; None if it can."""
    if os.sep in program:
        if not os.path.exists(program):
            return "no such file (is the plugin built?)"
        if os.path.isdir(program) or not os.access(program, os.X_OK):
            return "not an executable file"
        return None
    if shutil.which(program, path=environment.get("PATH", os.defpath)) is None:
        return "not found on the plugin's PATH"
    return None


def _close_pipes(process: asyncio.subprocess.Process) -> None:
    """Close our ends of ``process``'s pipes, whoever still holds theirs. asyncio's
    ``Process`` gives no public way to its pipes (its transport's ``close`` would also
    poll the process, reaping it under the child watcher, which then reports 255)."""
    transport: asyncio.SubprocessTransport = process._transport  # type: ignore[attr-defined]
    for fd in (0, 1, 2):
        pipe = transport.get_pipe_transport(fd)
        if pipe is not None:
            pipe.close()


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """Each line of ``stream``, a line longer than ``MAX_LINE_BYTES`` in pieces of that size.

    ``async for`` over a StreamReader raises ``ValueError`` at such a line: the reader
    ended there, every later line of the plugin went unlogged, and once the pipe was full
    the plugin's next write blocked for ever."""
    while True:
        try:
            line = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as ended:
            if ended.partial:
                yield ended.partial
            return
        except asyncio.LimitOverrunError as overrun:
            line = await stream.readexactly(min(overrun.consumed, MAX_LINE_BYTES))
        yield line


class Child:
    """One launch: the process, its socket folder, its connection, its output readers.

    Its stderr goes to ``plugin_log`` line by line from the start (the last lines are kept
    for error messages, and in ``output`` for ``logs``); stdout is the handshake's until
    ``drain_stdout``.
    """

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        folder: str,
        plugin_log: logging.Logger,
        output: OutputRing | None,
        rate: OutputRate,
    ) -> None:
        assert process.stdout is not None
        assert process.stderr is not None
        self.process = process
        self.folder = folder
        self.connection: PluginConnection | None = None
        #: Its Unix socket, pinned (``handshake.pin_socket``): what ``connection`` dials.
        self.socket_pin: PinnedSocket | None = None
        self.stderr_tail: list[str] = []
        self._plugin_log = plugin_log
        self._output = output
        #: How many of its lines a second are read as lines and logged (both streams).
        self.rate = rate
        self._on_end: list[Callable[[Child], None]] = []
        loop = asyncio.get_running_loop()
        self._readers = [loop.create_task(self._forward_stderr())]
        #: Set as soon as the process has exited (see ``_watch_exit``).
        self.exited = asyncio.Event()
        self._group_ended = False
        self._pidfd = self._watch_exit(loop)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _watch_exit(self, loop: asyncio.AbstractEventLoop) -> int | None:
        """Set ``exited`` in the loop's first turn after the process exits.

        ``process.wait()`` says it later, 6-27 ms after a SIGKILL here: asyncio resolves it
        only once the child watcher has reaped the process *and* its pipes have reached
        their end. Calls made in between went to a dead socket and failed, where calls made
        during a restart wait for the next process. A pidfd (Linux 5.3) turns readable the
        moment the process exits; where there is none, its return code is polled."""
        pidfd = None
        with contextlib.suppress(AttributeError, OSError):
            pidfd = os.pidfd_open(self.process.pid)
        if pidfd is None:
            self._readers.append(loop.create_task(self._wait_for_exit()))
            return None
        loop.add_reader(pidfd, self._exit_seen)
        return pidfd

    def _exit_seen(self) -> None:
        self._stop_watching()
        self._has_exited()

    def _has_exited(self) -> None:
        """The process has exited: end what it left in its process group, at once (its
        number cannot be another group's while one of them lives), and say so."""
        if not self._group_ended:
            self._group_ended = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.exited.set()

    def _stop_watching(self) -> None:
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)

    async def _wait_for_exit(self) -> None:
        # Not ``process.wait()``: it returns once the pipes end too, which the processes
        # this one left behind hold open until they are killed, here.
        while self.process.returncode is None:  # noqa: ASYNC110 - asyncio sets it, no event
            await asyncio.sleep(_EXIT_POLL_SECONDS)
        self._has_exited()

    async def reaped(self) -> int:
        """The process's exit code, once it has exited and its output has ended (read to
        its end, or cut off ``OUTPUT_AFTER_EXIT_SECONDS`` after the exit)."""
        await self.exited.wait()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OUTPUT_AFTER_EXIT_SECONDS):
                    await asyncio.wait(self._readers)
        finally:
            for reader in self._readers:
                reader.cancel()
            _close_pipes(self.process)
        await asyncio.wait(self._readers)
        self.rate.say()  # what went unlogged at the end, said before the launch goes
        self._stop_watching()
        return await self.process.wait()

    def on_end(self, callback: Callable[[Child], None]) -> None:
        """Call ``callback(self)`` once ``terminate`` has reaped the process."""
        self._on_end.append(callback)

    def drain_stdout(self) -> None:
        """After the handshake: stdout is not part of the protocol, but a full pipe would
        block the child."""
        self._readers.append(asyncio.get_running_loop().create_task(self._drain_stdout()))

    async def _forward_stderr(self) -> None:
        assert self.process.stderr is not None
        async for raw in self._lines_within_rate(self.process.stderr):
            # Escaped: the plugin's words reach log files, error messages and, through
            # ``dispatcher logs``, an operator's terminal, whose escape sequences they
            # must not drive. Tabs stay (a Java stack trace's lines begin with one).
            line = printable(raw.decode("utf-8", "replace").rstrip(), keep="\t")
            self.stderr_tail.append(line)
            del self.stderr_tail[:-20]
            if self._output is not None:
                self._output.append(line)
            # Tagged with this launch (its pid), so structured logs tell instances apart;
            # the plugin comes from the logger's name (dispatcher.telemetry.logs). At the
            # level the line carries (a plugin's WARNING stays one), else INFO.
            self._plugin_log.log(
                line_level(line), "%s", line, extra={"instance": f"pid {self.process.pid}"}
            )

    async def _drain_stdout(self) -> None:
        assert self.process.stdout is not None
        async for raw in self._lines_within_rate(self.process.stdout):
            line = printable(raw.decode("utf-8", "replace").rstrip(), keep="\t")
            self._plugin_log.debug("stdout: %s", line)

    async def _lines_within_rate(self, stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
        """Each line of ``stream`` that ``rate`` lets be logged; past it, ``skim``."""
        async for raw in _lines(stream):
            if self.rate.take():
                yield raw
            else:
                await self.rate.skim(stream)

    async def terminate(self, grace: float) -> int | None:
        """Close stdin, SIGTERM, then SIGKILL after ``grace`` seconds; reap; clean up."""
        process = self.process
        try:
            if self.connection is not None:
                # First: ending our Events stream lets the plugin's server stop without a
                # grace wait.
                connection, self.connection = self.connection, None
                await connection.close()
            if process.stdin is not None:
                with contextlib.suppress(Exception):
                    process.stdin.close()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(grace, 0.0)):
                        await self.exited.wait()
        finally:
            # Whatever interrupted us, the process does not outlive this call.
            if process.returncode is None and not self.exited.is_set():
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            if self.socket_pin is not None:
                self.socket_pin.close()  # after the connection: nothing dials it any more
            shutil.rmtree(self.folder, ignore_errors=True)
        code = await self.reaped()
        for callback in self._on_end:
            callback(self)
        return code
