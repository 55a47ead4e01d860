"""provider: wasm with a real runtime (libextism) and a real hostile plugin built with Go.

Everything here runs the module the Go toolchain builds from tests/plugins/wasm_hostile:
a loop that never ends, memory that grows without end, files and variables it was not
granted, a panic; and the dispatcher must answer each call typed and keep serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher import DeadlineExceeded, Dispatcher, MethodNotFound, PluginError, ProviderError
from providers.capabilities import LimitExceeded
from providers.wasm import ModuleRefused
from providers.wasm.module import exported_functions, read_pinned
from tests.conftest import manifest
from tests.wasm_support import HOSTILE_METHODS, build_hostile, wasm_plugin

pytestmark = pytest.mark.toolchain


@pytest.fixture(scope="module")
def hostile_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hostile(tmp_path_factory.mktemp("wasm"))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One on-disk compile cache for the module: each test's dispatcher skips compiling."""
    return tmp_path_factory.mktemp("wasm-cache")


def hostile(module: Path, cache: Path, **extra: Any) -> dict[str, Any]:
    return wasm_plugin(module, cache_dir=str(cache), **extra)


@pytest.fixture
async def dispatcher(hostile_module: Path, compile_cache: Path) -> AsyncIterator[Dispatcher]:
    async with Dispatcher(
        manifest(hostile(hostile_module, compile_cache, capabilities={"memory_mb": 64}))
    ) as running:
        yield running


def wasm_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("wasm-")]


async def test_an_infinite_loop_stops_at_the_deadline_and_the_dispatcher_keeps_serving(
    dispatcher: Dispatcher,
) -> None:
    started = time.perf_counter()
    spinning = asyncio.create_task(dispatcher.call("hostile", "spin", None, timeout=0.5))
    # While it spins on its thread, the loop and the other instances keep answering.
    assert await dispatcher.call("hostile", "echo", "beside it") == "beside it"
    with pytest.raises(DeadlineExceeded):
        await spinning
    assert 0.45 <= time.perf_counter() - started < 2.0
    assert await dispatcher.call("hostile", "echo", "after it") == "after it"


async def test_the_event_loop_is_not_blocked_by_running_modules(dispatcher: Dispatcher) -> None:
    spinning = [
        asyncio.create_task(dispatcher.call("hostile", "spin", None, timeout=0.6)) for _ in range(4)
    ]
    ticks = 0
    started = time.perf_counter()
    while time.perf_counter() - started < 0.4:
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks >= 10  # ~40 without contention; a blocked loop would manage one
    for task in spinning:
        with pytest.raises(DeadlineExceeded):
            await task


async def test_memory_growth_past_the_limit_fails_typed(dispatcher: Dispatcher) -> None:
    with pytest.raises(LimitExceeded) as caught:
        await dispatcher.call("hostile", "hog", None, timeout=20)
    assert caught.value.limit == "memory_mb"
    assert caught.value.details == {"limit": "memory_mb", "value": 64}
    assert caught.value.retryable is False
    assert await dispatcher.call("hostile", "echo", 1) == 1


async def test_a_cpu_limit_stops_a_call_before_its_deadline(
    hostile_module: Path, compile_cache: Path
) -> None:
    plugin = hostile(hostile_module, compile_cache, capabilities={"cpu_s": 0.2})
    async with Dispatcher(manifest(plugin)) as dispatcher:
        started = time.perf_counter()
        with pytest.raises(LimitExceeded) as caught:
            await dispatcher.call("hostile", "spin", None, timeout=10)
        assert caught.value.limit == "cpu_s"
        assert time.perf_counter() - started < 2.0


async def test_a_crash_fails_only_that_call(dispatcher: Dispatcher) -> None:
    with pytest.raises(ProviderError, match="the wasm module failed") as caught:
        await dispatcher.call("hostile", "crash", None)
    assert "runtime.gopanic" in caught.value.message  # the trap's backtrace says where
    assert await dispatcher.call("hostile", "echo", "alive") == "alive"


async def test_files_not_granted_cannot_be_read_or_written(
    dispatcher: Dispatcher, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    for path in (str(secret), "/etc/passwd"):
        with pytest.raises(PluginError) as caught:
            await dispatcher.call("hostile", "read_file", path)
        assert caught.value.remote_type == "FileError"
    with pytest.raises(PluginError):
        await dispatcher.call("hostile", "write_file", str(tmp_path / "dropped.txt"))
    assert not (tmp_path / "dropped.txt").exists()


async def test_granted_files_are_readable_and_writable_as_granted(
    hostile_module: Path, compile_cache: Path, tmp_path: Path
) -> None:
    readable, writable = tmp_path / "ro", tmp_path / "rw"
    readable.mkdir()
    writable.mkdir()
    (readable / "data.txt").write_text("granted")
    capabilities = {
        "files": [{"path": str(readable), "mode": "ro"}, {"path": str(writable), "mode": "rw"}]
    }
    async with Dispatcher(
        manifest(hostile(hostile_module, compile_cache, capabilities=capabilities))
    ) as dispatcher:
        assert (
            await dispatcher.call("hostile", "read_file", str(readable / "data.txt")) == "granted"
        )
        with pytest.raises(PluginError) as caught:
            await dispatcher.call("hostile", "write_file", str(readable / "new.txt"))
        assert caught.value.remote_type == "FileError"
        assert await dispatcher.call("hostile", "write_file", str(writable / "new.txt")) is True
    assert (writable / "new.txt").read_text() == "written by the plugin"
    assert not (readable / "new.txt").exists()


async def test_only_declared_variables_reach_the_plugin(
    hostile_module: Path, compile_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WASM_GRANTED", "yes")
    monkeypatch.setenv("WASM_SECRET", "do not leak")
    plugin = hostile(hostile_module, compile_cache, capabilities={"env": ["WASM_GRANTED"]})
    async with Dispatcher(manifest(plugin)) as dispatcher:
        assert await dispatcher.call("hostile", "env", "WASM_GRANTED") == "yes"
        assert await dispatcher.call("hostile", "env", "WASM_SECRET") is None
        assert await dispatcher.call("hostile", "environ", None) == ""


async def test_a_tampered_module_is_refused(
    hostile_module: Path, compile_cache: Path, tmp_path: Path
) -> None:
    plugin = hostile(hostile_module, compile_cache)
    tampered = tmp_path / "tampered.wasm"
    code = bytearray(hostile_module.read_bytes())  # noqa: ASYNC240 - a test's setup
    code[len(code) // 2] ^= 0xFF
    tampered.write_bytes(bytes(code))
    plugin["target"]["module"] = str(tampered)  # the pin is still the original's
    with pytest.raises(ModuleRefused, match="refusing a module that is not the one pinned"):
        async with Dispatcher(manifest(plugin)):
            pass
    assert wasm_threads() == []


async def test_a_method_the_module_does_not_export_is_refused_at_attach(
    hostile_module: Path, compile_cache: Path
) -> None:
    plugin = hostile(hostile_module, compile_cache, methods=("echo", "launch_missiles"))
    with pytest.raises(ProviderError, match="launch_missiles"):
        async with Dispatcher(manifest(plugin)):
            pass


async def test_a_reload_that_changes_the_methods_on_the_same_target_checks_the_exports(
    hostile_module: Path, compile_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload adds methods to a running version and leaves its target equal: nothing is
    attached again (the same pool), and the new entry's methods are checked against the
    module's exports. Before: the callable methods were those of the attach, so a method
    the reload added failed MethodNotFound though the module exports it, and one it does
    not export was never said. The reload cannot be refused by then: the missing one is
    said as a method the target does not serve, and named by health."""
    caplog.set_level(logging.WARNING, logger="dispatcher")
    first = hostile(hostile_module, compile_cache, methods=("echo",))
    async with Dispatcher(manifest(first)) as dispatcher:
        provider = dispatcher.providers["wasm"]
        (pool,) = [each.pool for each in provider._attached.values()]
        added = hostile(hostile_module, compile_cache, methods=("echo", "environ"))
        summary = await dispatcher.reload(manifest(added))
        assert summary["changed"] == ["hostile@1.0.0"]
        assert await dispatcher.call("hostile", "environ", None) == ""

        missing = hostile(hostile_module, compile_cache, methods=("echo", "launch_missiles"))
        await dispatcher.reload(manifest(missing))
        (warning,) = [
            record.getMessage()
            for record in caplog.records
            if "the manifest routes" in record.getMessage()
        ]
        assert warning.startswith("hostile@1.0.0: the manifest routes launch_missiles to wasm")
        (report,) = await dispatcher.health()
        assert report.missing_methods == ("launch_missiles",)
        with pytest.raises(MethodNotFound, match="launch_missiles"):
            await dispatcher.call("hostile", "launch_missiles", None)
        with pytest.raises(MethodNotFound):  # removed by this reload
            await dispatcher.call("hostile", "environ", None)
        assert await dispatcher.call("hostile", "echo", "still") == "still"
        assert [each.pool for each in provider._attached.values()] == [pool]


async def test_1000_concurrent_calls_to_a_pooled_plugin_each_answer_their_caller(
    dispatcher: Dispatcher,
) -> None:
    results = await asyncio.gather(
        *(dispatcher.call("hostile", "echo", {"caller": i}, timeout=60) for i in range(1000))
    )
    assert results == [{"caller": i} for i in range(1000)]


async def test_pooled_instances_keep_their_memory_and_fresh_ones_do_not(
    hostile_module: Path, compile_cache: Path
) -> None:
    pooled = hostile(hostile_module, compile_cache, pool_size=1)
    fresh = hostile(hostile_module, compile_cache, plugin_id="fresh", instances="fresh")
    async with Dispatcher(manifest(pooled, fresh)) as dispatcher:
        assert [await dispatcher.call("hostile", "remember", None) for _ in range(3)] == [1, 2, 3]
        assert [await dispatcher.call("fresh", "remember", None) for _ in range(3)] == [1, 1, 1]
        # A call that was stopped drops its instance: the next one starts from nothing.
        with pytest.raises(DeadlineExceeded):
            await dispatcher.call("hostile", "spin", None, timeout=0.2)
        assert await dispatcher.call("hostile", "remember", None) == 1


async def test_nothing_is_left_running_after_the_dispatcher_closes(
    hostile_module: Path, compile_cache: Path
) -> None:
    async with Dispatcher(manifest(hostile(hostile_module, compile_cache))) as dispatcher:
        spinning = asyncio.create_task(dispatcher.call("hostile", "spin", None, timeout=30))
        await asyncio.sleep(0.2)
        assert wasm_threads()
    with pytest.raises(Exception):  # noqa: B017, PT011 - ended by the shutdown, whatever its type
        await spinning
    assert wasm_threads() == []


async def test_the_compile_cache_is_written_and_reused(
    hostile_module: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    plugin = hostile(hostile_module, cache)
    started = time.perf_counter()
    async with Dispatcher(manifest(plugin)):
        cold = time.perf_counter() - started
    assert any(path.is_file() and path.suffix != ".toml" for path in cache.rglob("*"))
    started = time.perf_counter()
    async with Dispatcher(manifest(plugin)) as dispatcher:
        warm = time.perf_counter() - started
        assert await dispatcher.call("hostile", "echo", "cached") == "cached"
    assert warm < cold, (warm, cold)


def test_the_module_read_is_refused_with_a_message_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModuleRefused, match="cannot read"):
        read_pinned(tmp_path / "missing.wasm", "0" * 64)
    assert os.environ.get("EXTISM_CACHE_CONFIG") is None


async def test_one_calls_deadline_does_not_stop_another_running_beside_it(
    dispatcher: Dispatcher,
) -> None:
    # libextism cancels every instance of one compiled module at once; lanes keep them apart.
    started = time.perf_counter()
    short = asyncio.create_task(dispatcher.call("hostile", "spin", None, timeout=0.3))
    long = asyncio.create_task(dispatcher.call("hostile", "spin", None, timeout=1.5))
    with pytest.raises(DeadlineExceeded):
        await short
    with pytest.raises(DeadlineExceeded):
        await long
    assert time.perf_counter() - started >= 1.45


def test_the_exported_functions_are_read_from_the_module(hostile_module: Path) -> None:
    exported = exported_functions(hostile_module.read_bytes())
    assert set(HOSTILE_METHODS) <= exported
    assert "launch_missiles" not in exported


# A module of one export section: ``echo`` a function, ``memory`` a memory.
EXPORTS = b"\x02\x04echo\x00\x00\x06memory\x02\x00"
PREAMBLE = b"\x00asm\x01\x00\x00\x00"


@pytest.mark.parametrize(
    "before",
    [b"", b" \n\t", b";; licence: MIT\n;; the echo module\n\n", b"(; a block comment ;)\n"],
    ids=["nothing", "blanks", "line-comments", "block-comment"],
)
async def test_a_module_in_the_text_format_attaches_whatever_comment_comes_first(
    tmp_path: Path, before: bytes
) -> None:
    """A ``.wat`` may begin with comments, which the runtime compiles past. Before: one
    that began with a line comment (a licence header) was refused at attach, after the
    runtime had compiled it and its instance had every method, as "not a core
    WebAssembly module" (its exports were read as a binary module's). Now it attaches
    (and runs: this one writes no output, which its call says)."""
    module = tmp_path / "echo.wat"
    module.write_bytes(before + b'(module (func (export "echo") (result i32) i32.const 0))')
    assert exported_functions(module.read_bytes()) is None
    async with Dispatcher(manifest(wasm_plugin(module, methods=("echo",)))) as dispatcher:
        with pytest.raises(ProviderError, match="output is not JSON"):
            await dispatcher.call("hostile", "echo", {})
    for not_a_module in (b";; a comment and nothing else", b";; a comment\n\x7fELF"):
        with pytest.raises(ModuleRefused, match="not a core WebAssembly module"):
            exported_functions(not_a_module)


@pytest.mark.parametrize(
    ("code", "refused"),
    [
        (b"\x7fELF", "not a core WebAssembly module"),
        (PREAMBLE + b"\x07\x30" + EXPORTS, "ends inside a section"),  # its size lies
        (PREAMBLE + b"\x07\x0a" + EXPORTS[:10], "ends inside a section"),
        (PREAMBLE + b"\x07\x12" + EXPORTS + b"\x00", "does not add up"),
        (PREAMBLE + b"\x07\x06\x01\x02\xff\xfe\x00\x00", "not UTF-8"),
        (PREAMBLE + b"\x07\xff\xff\xff\xff\xff\x01", "longer than 32 bits"),
    ],
    ids=["not-wasm", "section-past-the-end", "cut-short", "trailing-bytes", "name", "number"],
)
def test_a_malformed_module_s_exports_are_refused_typed(code: bytes, refused: str) -> None:
    assert exported_functions(PREAMBLE + b"\x07\x11" + EXPORTS) == {"echo"}
    assert exported_functions(b' (module (func (export "echo")))') is None  # text: not read
    with pytest.raises(ModuleRefused, match=refused):
        exported_functions(code)
