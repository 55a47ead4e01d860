"""The Extism runtime (libextism, wasmtime inside), behind the few calls the provider makes.

The only module that imports ``extism``; the provider imports this one when it starts,
so loading a manifest never loads the native library. Everything here blocks and runs on
the provider's worker threads, except ``Instance.cancel``, which any thread may call:
libextism releases the GIL for the length of a call (cffi), so calls on several threads
run in parallel and the event loop keeps running.

Extism reports every failure as one string; ``CallFailed.kind`` sorts them: the host's
cancel (our deadline), the memory limit, a trap or exit of the module, or an error the
plugin set itself (``pdk.SetError``); and ``http``, a request the module made through
``http_request`` that the dispatcher refused or that failed (``CallFailed.error``).

HTTP: libextism's ``http_request``, ``http_status_code`` and ``http_headers`` are shadowed
by the host functions below (its linker links a host's functions after its own, shadowing
allowed), so every request goes through ``providers.wasm.http_host``. Each call's
``HttpState`` (its end, its last status and headers) is kept for the thread the call runs
on (``Instance.call``). Four things about Python host functions shape them:

* an exception raised in one is printed by cffi and dropped, and the module goes on as if
  it had an answer: every failure is caught and handed to ``HttpState.fail``, which keeps
  it for the provider and cancels the call (the module stops at its next instruction);
* once a call is cancelled (``HttpState.fail``, or its deadline, its cpu_s, a close:
  ``Instance.cancel`` marks it ``stopped``), the module runs on until an instruction where
  the cancel takes effect (the start of a function or of a loop), and may call a host
  function meanwhile; but every call into Extism's own functions (the kernel: a block's
  length, alloc, free) now ends in a trap, so a request is neither read nor judged then,
  nor an answer written: nothing goes out, and no failure is made up from a length of 0;
* the SDK reads a memory block as long as the module's allocator says it is, and that
  allocator's bookkeeping lies in memory the module can write (``store_u8``): a block
  claiming more bytes than the memory holds would have the dispatcher read (and write)
  past it, a crash or a leak of the host's memory. Bytes go in and out through the kernel
  instead (``write``/``preadv`` on a memfd), which answers EFAULT where a pointer would fault;
  a request's body is copied out once, into the memfd, and sent from a read-only mapping of
  it, and only once the request passed every check (``http_host.RequestBody``);
* a module's start code (``_initialize``, a start function: Go's ``init`` functions) runs
  while libextism instantiates it, when the instance's pointers to its store are not set
  yet (null while it links, stale until a call has set its input): every
  ``extism_current_plugin_*`` function, the host context's lookup included, would end the
  process (SIGSEGV). So the host functions reach the instance only within
  ``Instance.call``, and an instance's first call runs its start code first, by a call of
  a name it cannot export (``Instance._instantiate``): start code is answered as if no
  request had been made (0), nothing is sent, and a call never meets it. The blocks of
  its request are not freed then (that reaches the instance too), and need not be:
  libextism resets Extism's memory as a call sets its input, every block freed, and the
  call that ran the start code does so right after it. Not
  mendable here: start code that libextism runs as it links the module (a reactor's
  ``_initialize``) and that calls a host function with arguments (``http_request``, or
  libextism's own ``config_get``) ends the process inside libextism, whose wrapper reads
  the arguments through the null pointer before any function of ours is reached. The
  provider makes a module's first instance in a child process first
  (``providers.wasm.trial``) and refuses a module that ends it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import extism
import orjson
from extism import extism as _extism

from linchkit_plugin.errors import DispatchError, ProviderError
from providers.capabilities import LimitExceeded
from providers.wasm.http_host import MAX_REQUEST_BYTES, HttpGrant, HttpState, NetworkRefused

__all__ = ["CallFailed", "Compiled", "Instance", "runtime_version"]

#: The environment variable libextism reads, when it compiles, for wasmtime's cache config.
_CACHE_VARIABLE = "EXTISM_CACHE_CONFIG"
_cache_lock = threading.Lock()

#: ``host``: the dispatcher's side failed (its compile cache folder cannot be written).
#: ``http``: a request through ``http_request`` was refused or failed (``CallFailed.error``).
#: ``runtime``: libextism could not set the call up on the instance: the module never ran.
FailureKind = Literal["cancelled", "memory", "trap", "plugin", "host", "http", "runtime"]

#: How libextism words its own failure to set a call up on an instance, before the
#: module's function runs (libextism 1.x, ``runtime/src/plugin.rs``). An instance made
#: while a cancel of another instance of its module was on its way (wasmtime's epoch,
#: which every instance of a module shares, moved on between the instance's making and
#: its first call) fails each call so, for good: read as the plugin's own error, that
#: instance stayed in the pool and every call it took failed (``unable to clear error
#: message``, seen under load). Matched whole or as a prefix: a plugin's own message is
#: its own text, and one that chose these words only loses its instance.
_SET_UP_FAILED = (
    "unable to clear error message",
    "Plugin::clear_error failed",
    "unable to set extism input",
    "unable to set extism host context",
    "extism reset failed",
    "call to extism:host/env::reset failed",
    "unable to reset plugin: ",
)


def runtime_version() -> str:
    return str(extism.extism_version())


class CallFailed(Exception):
    """One call ended without output."""

    def __init__(
        self, kind: FailureKind, message: str, *, error: DispatchError | None = None
    ) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind
        self.message = message
        #: ``http``: the typed error the caller gets.
        self.error = error


def _kind_of(message: str) -> FailureKind:
    if message == "timeout":  # libextism's word for a cancelled call
        return "cancelled"
    if message == "oom":
        return "memory"
    if message.startswith(_SET_UP_FAILED):
        return "runtime"
    # A trap (unreachable, stack overflow…) carries wasmtime's backtrace; an exit (a Go
    # panic calls proc_exit) names its code. Anything else the plugin set itself.
    if "wasm backtrace" in message or message.startswith(("Error code", "Plugin exited")):
        return "trap"
    return "plugin"


class Compiled:
    """A module compiled with its sandbox options; instances are made from it.

    Always through wasmtime's on-disk cache in ``cache_dir``: libextism keeps no compiled
    module in memory between compiles (each costs seconds for a Go module), and a pool
    compiles once per lane. Left unset, libextism would use ``~/.cache/wasmtime``; the
    provider names the folder instead (the target's ``cache_dir`` or a private one).
    """

    def __init__(
        self,
        code: bytes,
        sha256: str,
        options: dict[str, Any],
        cache_dir: Path,
        network: HttpGrant | None = None,
    ) -> None:
        """``network``: where its instances' HTTP requests may go (None: nowhere)."""
        self._network = network
        manifest = {"wasm": [{"data": code, "hash": sha256}], **options}
        try:
            self._compiled = self._compile_cached(manifest, cache_dir)
        except extism.Error as error:
            raise CallFailed("trap", f"cannot compile the module: {error}") from error
        except OSError as error:  # the cache folder: not writable, not a folder, disk full
            raise CallFailed(
                "host", f"cannot use the compile cache in {cache_dir}: {error.strerror or error}"
            ) from error

    @staticmethod
    def _compile_cached(manifest: dict[str, Any], cache_dir: Path) -> Any:
        # wasmtime keys its cache by the module's bytes, the compiler settings and its own
        # version; a folder per libextism version keeps upgrades from sharing one.
        folder = cache_dir / f"extism-{runtime_version()}"
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "wasmtime-cache.toml"
        text = f'[cache]\ndirectory = "{folder}"\n'
        # libextism reads the variable (and the file) when it compiles; the lock keeps two
        # compiles from seeing each other's folder or a half-written file.
        with _cache_lock:
            if not config.exists() or config.read_text() != text:
                partial = config.with_suffix(".tmp")
                partial.write_text(text)
                partial.replace(config)
            previous = os.environ.get(_CACHE_VARIABLE)
            os.environ[_CACHE_VARIABLE] = str(config)
            try:
                return _extism.CompiledPlugin(manifest, wasi=True, functions=_HTTP_FUNCTIONS)
            finally:
                if previous is None:
                    del os.environ[_CACHE_VARIABLE]
                else:
                    os.environ[_CACHE_VARIABLE] = previous

    def instantiate(self, config: dict[str, str]) -> Instance:
        try:
            plugin = extism.Plugin(self._compiled, wasi=True, config=config, functions=[])
        except extism.Error as error:
            raise CallFailed("trap", f"cannot instantiate the module: {error}") from error
        return Instance(plugin, self._network)

    def close(self) -> None:
        self._compiled.__del__()  # frees the native module now, not when collected


@dataclass(eq=False, slots=True)
class Instance:
    """One instance of a module: one call at a time, on any thread."""

    _plugin: Any
    _network: HttpGrant | None = None
    _cancel: Any = None
    #: False once a call trapped: what is left of its memory is not to be trusted.
    healthy: bool = True
    #: Whether libextism has instantiated it (run its start code) and set its pointers
    #: to its store (``_instantiate``).
    _instantiated: bool = False
    #: The HTTP side of the call under way, told when the call is cancelled.
    _http: HttpState | None = None
    #: Whether the thread is inside libextism's call, and whether a cancel came before it
    #: got there: both read and set under ``_entry`` (``cancel``, ``_enter``).
    _inside: bool = False
    _stopped: bool = False
    #: Whether libextism was told to stop a call of this instance: its timer thread bumps
    #: the epoch of the module's engine when it gets to it, which may be after the call
    #: has returned (``InstancePool._settle`` then retires the module with it).
    cancel_sent: bool = False
    _entry: threading.Lock = field(default_factory=threading.Lock)
    #: The CPU clock of the thread inside libextism's call (``cpu_seconds``).
    _clock: int | None = None

    def __post_init__(self) -> None:
        self._cancel = self._plugin.cancel_handle()

    def exports(self, name: str) -> bool:
        return bool(self._plugin.function_exists(name))

    def call(self, function: str, payload: bytes, *, ends: float) -> bytes:
        """Run ``function``; its HTTP requests end at ``ends`` (``time.monotonic()``), when
        the pool stops the call."""
        if not self._instantiated:
            self._instantiate()
        http = HttpState(self._network, ends, self.cancel)
        output, failed = b"", None
        _calling.state = self._http = http
        try:
            self._enter(ends)
            output = bytes(self._plugin.call(function, payload))
        except extism.Error as error:
            message = str(error)
            failed = CallFailed(_kind_of(message), message)
        finally:
            with self._entry:
                self._inside = self._stopped = False
                self._clock = None
            _calling.state = self._http = None
        # What the HTTP host functions saw comes first: they stopped the module for it, and
        # it may even have finished before the stop reached it.
        if http.timed_out:
            raise CallFailed("cancelled", "timeout")
        if http.failure is not None:
            raise CallFailed("http", http.failure.message, error=http.failure)
        if failed is not None:
            raise failed
        return output

    def _instantiate(self) -> None:
        """Run the start code libextism runs at an instance's first call, before that call.

        libextism instantiates a module at its first call, and sets the instance's pointers
        to its store only after the start code ran (module docstring): a call of a name no
        module can know runs it outside the state of any call (so the host functions reach
        nothing), and fails once the pointers are set. As before, within the first call's
        time, and no cancel reaches it."""
        unknown = f"linchkit-instantiate-{uuid.uuid4().hex}"
        try:
            self._plugin.call(unknown, b"")
        except extism.Error as error:
            message = str(error)
            if message != f"Function not found: {unknown}":  # the start code failed
                raise CallFailed(_kind_of(message), message) from None
        self._instantiated = True

    def _enter(self, ends: float) -> None:
        """Refuse to begin a call whose time is up or that was cancelled already.

        libextism registers a call with its timer thread before it arms the call's
        deadline (1.x, ``Plugin::raw_call``), and a cancel handled in between is spent:
        the deadline is armed past it and the registration is gone, so no later cancel
        reaches the call, and a module in a loop runs on for ever on a core, its slot
        taken. A cancel that comes before the thread gets here never goes to libextism,
        so the only cancels that can fall in that gap are those of calls whose time ends
        within microseconds of their start (a loaded machine can stretch them)."""
        with self._entry:
            if self._stopped or time.monotonic() >= ends:
                raise CallFailed("cancelled", "timeout")
            self._inside = True
            self._clock = time.pthread_getcpuclockid(threading.get_ident())

    def cpu_seconds(self) -> float | None:
        """The CPU time of the thread running this instance's call, None between calls: a
        module asleep in a host call spends none, one that a cancel missed spends a core."""
        with self._entry:
            clock = self._clock
        return None if clock is None else time.clock_gettime(clock)

    def cancel(self) -> None:
        """Stop the running call at its next instruction boundary (any thread); a call
        not begun yet is not begun."""
        http = self._http
        if http is not None:
            http.stopped = True
        with self._entry:
            if not self._inside:
                self._stopped = True
                return
            self.cancel_sent = True
        self._cancel.cancel()

    def close(self) -> None:
        self._plugin.__del__()


# -- the HTTP host functions ----------------------------------------------------------------

_ENV = "extism:host/env"
_I32, _I64 = extism.ValType.I32, extism.ValType.I64


def _http_request(current: Any, inputs: list[Any], outputs: list[Any], *_: Any) -> None:
    """``http_request(request, body) -> body``: Extism's request JSON and body (0: none),
    both the host's to free as in libextism; the answer's body, or 0 when it is empty."""
    outputs[0].value = 0
    state = _state()
    if state is None:  # start code: nothing sent, and the instance not reached (not even
        return  # to free the blocks: libextism's reset frees them, module docstring)
    if state.stopped:
        # Cancelled, and not yet at an instruction where that takes effect: libextism now
        # ends every call into Extism's own functions with a trap, so the blocks can be
        # neither read nor freed (a length of 0 would read as a forged block, a false
        # alarm). Nothing is judged, nothing goes out.
        return
    request, body = inputs[0].value, inputs[1].value
    try:
        answer = state.request(
            _read(current, request, "request JSON", MAX_REQUEST_BYTES, state),
            _ModuleBody(current, body, state) if body else None,
        )
        outputs[0].value = _write(current, answer, state)
    except _Cancelled:  # meanwhile (above): the call ends as cancelled, nothing made up
        pass
    except BaseException as error:  # cffi would drop it, and the module go on
        state.fail(error)
    finally:  # after the answer is placed, so it never takes the blocks the module frees too
        _free(current, request)
        _free(current, body)


def _http_status_code(current: Any, inputs: list[Any], outputs: list[Any], *_: Any) -> None:
    """The last answer's status in this call; 0 before one, or after a failed request."""
    state = _state()
    outputs[0].value = state.status if state is not None else 0


def _http_headers(current: Any, inputs: list[Any], outputs: list[Any], *_: Any) -> None:
    """The last answer's headers in this call as a JSON object (names in lower case); 0
    before one. Always given: Extism asks the host to allow it, and a module may read its
    own answer's headers."""
    outputs[0].value = 0
    state = _state()
    if state is None or state.headers is None or state.stopped:
        return
    try:
        outputs[0].value = _write(current, orjson.dumps(state.headers), state)
    except _Cancelled:
        pass
    except BaseException as error:
        state.fail(error)


# Registered once, for the process: the SDK finds a host function by its index in a global
# registry, so functions made per plugin would pile up there. Per call state comes from
# the thread the call runs on instead (``_calling``).
_HTTP_FUNCTIONS = [
    extism.host_fn(name="http_request", namespace=_ENV, signature=([_I64, _I64], [_I64]))(
        _http_request
    ),
    extism.host_fn(name="http_status_code", namespace=_ENV, signature=([], [_I32]))(
        _http_status_code
    ),
    extism.host_fn(name="http_headers", namespace=_ENV, signature=([], [_I64]))(_http_headers),
]

_lib, _ffi = _extism._lib, _extism._ffi

#: ``state``: the ``HttpState`` of the call this thread runs (``Instance.call``), None
#: outside one. Host functions run on the calling thread, synchronously.
_calling = threading.local()


def _state() -> HttpState | None:
    """The state of the call under way on this thread; None outside ``Instance.call``
    (start code, run as an instance is made), where the instance must not be reached
    (module docstring)."""
    state: HttpState | None = getattr(_calling, "state", None)
    return state


class _Cancelled(Exception):
    """Extism's own functions failed because the call was cancelled meanwhile (they trap
    once it is): what they answered says nothing about the module's blocks."""


def _read(current: Any, offset: int, what: str, limit: int, state: HttpState) -> bytes:
    """The memory block at ``offset``, copied out of the module."""
    length = _length_of(current, offset, what, state)
    if length > limit:
        raise NetworkRefused(f"HTTP request refused: its {what} is {length} bytes, at most {limit}")
    with _block_copied(current, offset, length, what) as data:
        return bytes(data)


class _ModuleBody:
    """A request's body, still in the module's memory (``http_host.RequestBody``): its
    length read from Extism's records now, its bytes copied out when the request is sent
    (after the bound on it is checked, so a body past it is never copied)."""

    __slots__ = ("_current", "_length", "_offset")

    def __init__(self, current: Any, offset: int, state: HttpState) -> None:
        self._current = current
        self._offset = offset
        self._length = _length_of(current, offset, "body", state)

    def __len__(self) -> int:
        return self._length

    def copied(self) -> contextlib.AbstractContextManager[memoryview]:
        return _block_copied(self._current, self._offset, self._length, "body")


def _length_of(current: Any, offset: int, what: str, state: HttpState) -> int:
    """The length Extism's records give the block at ``offset`` (the module can write them)."""
    length = _lib.extism_current_plugin_memory_length(current.pointer, offset) if offset > 0 else 0
    if length == 0:
        if state.stopped:  # looked at after the answer: a cancel is marked before it is sent
            raise _Cancelled
        raise NetworkRefused(f"HTTP request refused: its {what} is not an Extism memory block")
    return int(length)


@contextlib.contextmanager
def _block_copied(current: Any, offset: int, length: int, what: str) -> Iterator[memoryview]:
    """The ``length`` bytes at ``offset``, copied out of the module (``_copied_out``)."""
    base = _lib.extism_current_plugin_memory(current.pointer)
    inside = _within_reservation(offset, length) and base != _ffi.NULL
    with _copied_out(base + offset if inside else None, length) as data:
        if data is None:
            raise NetworkRefused(
                f"HTTP request refused: its {what} at {offset} claims {length} bytes, past the"
                " end of the module's memory (its allocator's records were written over)"
            )
        yield data


def _write(current: Any, data: bytes, state: HttpState) -> int:
    """A new memory block holding ``data``; its offset (0 for no bytes, as Extism's)."""
    if not data:
        return 0
    offset = _lib.extism_current_plugin_memory_alloc(current.pointer, len(data))
    if offset == 0:
        if state.stopped:
            raise _Cancelled
        raise LimitExceeded(
            f"the answer's {len(data)} bytes do not fit in the module's memory (memory_mb)",
            limit="memory_mb",
            value=None,
        )
    base = _lib.extism_current_plugin_memory(current.pointer)
    inside = _within_reservation(offset, len(data)) and base != _ffi.NULL
    if not inside or not _copied_in(base + offset, data):
        _free(current, offset)
        raise ProviderError(
            f"the block Extism allocated for the answer ({len(data)} bytes at {offset}) is"
            " not all inside the module's memory (its allocator's records were written over)"
        )
    return int(offset)


#: Extism's kernel memory is a 32-bit wasm memory: every byte of it lies below 4 GiB from
#: its base, inside the address range wasmtime reserves for it (inaccessible past the
#: memory's size). An offset or a length beyond that comes from allocator records the
#: module wrote over, and would point the copy at the host's own memory, where the kernel
#: reads and writes as readily as in the module's: refused before any address is made.
_MEMORY32_BYTES = 1 << 32


def _within_reservation(offset: int, length: int) -> bool:
    return offset > 0 and length > 0 and offset + length <= _MEMORY32_BYTES


def _free(current: Any, offset: int) -> None:
    if offset > 0:
        _lib.extism_current_plugin_memory_free(current.pointer, offset)


@contextlib.contextmanager
def _copied_out(address: Any, length: int) -> Iterator[memoryview | None]:
    """``length`` bytes from ``address`` (a pointer into a module's memory, checked by
    ``_within_reservation``; None: none to read), readable within the ``with``; None when
    not all of them can be read. The kernel reads them (``write`` into a memfd): a page
    past the memory's size is an EFAULT, not a fault of the dispatcher. They are seen
    through a read-only mapping of the memfd: one copy, however large."""
    mapped = None
    if address is not None:
        view = memoryview(_ffi.buffer(address, length))
        scratch = os.memfd_create("linchkit-wasm-memory", os.MFD_CLOEXEC)
        try:
            if _written(scratch, view):
                mapped = mmap.mmap(scratch, length, prot=mmap.PROT_READ)
        finally:
            os.close(scratch)  # the mapping keeps the memfd's pages
    if mapped is None:
        yield None
        return
    with mapped, memoryview(mapped) as copied:
        yield copied


def _written(scratch: int, view: memoryview) -> bool:
    done = 0
    while done < len(view):
        try:
            written = os.write(scratch, view[done:])
        except OSError:
            return False
        if written == 0:
            return False
        done += written
    return True


def _copied_in(address: Any, data: bytes) -> bool:
    """Write ``data`` at ``address`` (a pointer into a module's memory); False when not all
    of it could be written (the kernel writes it: ``preadv`` from a memfd)."""
    view = memoryview(_ffi.buffer(address, len(data)))
    source = memoryview(data)
    scratch = os.memfd_create("linchkit-wasm-memory", os.MFD_CLOEXEC)
    try:
        done = 0
        while done < len(data):
            done += os.write(scratch, source[done:])
        done = 0
        while done < len(data):
            try:
                read = os.preadv(scratch, [view[done:]], done)
            except OSError:
                return False
            if read == 0:
                return False
            done += read
        return True
    finally:
        os.close(scratch)
