"""provider: wasm against modules that play with time and with their own start: a loop
whose stop comes before it starts, a host call that holds its instance past other callers'
deadlines, start code that takes long or traps.

The modules are written in the WebAssembly text format (libextism compiles it as it does a
.wasm file), so each hostile behaviour is a few exact instructions and no toolchain runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher import (
    DeadlineExceeded,
    Dispatcher,
    ManifestError,
    ProviderError,
    TargetUnavailable,
    parse_manifest,
)
from providers.capabilities import Capabilities
from providers.wasm import pool as wasm_pool
from providers.wasm.pool import InstancePool, _run
from providers.wasm.runtime import CallFailed, Compiled
from providers.wasm.sandbox import sandbox_of
from providers.wasm.workers import Workers
from tests.conftest import manifest
from tests.services import until

#: ``spin`` never returns; ``nap`` sleeps in WASI's poll_oneoff (a host call, which epoch
#: interruption cannot stop) for NAP_SECONDS; ``one`` answers the JSON ``1``.
NAP_SECONDS = 3
HOSTILE_WAT = f"""(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (memory (export "memory") 1)
  (func (export "spin") (result i32) (loop $again (br $again)) (i32.const 0))
  (func (export "nap") (result i32)
    ;; one subscription at 0: a relative clock of NAP_SECONDS; events at 64, their count at 128
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const {NAP_SECONDS * 1_000_000_000}))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
    (i32.const 0))
  (func (export "one") (result i32) (local $at i64)
    (local.set $at (call $alloc (i64.const 1)))
    (call $store_u8 (local.get $at) (i32.const 49))
    (call $output_set (local.get $at) (i64.const 1))
    (i32.const 0))
)""".encode()


@pytest.fixture
def module(tmp_path: Path) -> Path:
    path = tmp_path / "hostile.wat"
    path.write_bytes(HOSTILE_WAT)
    return path


def plugin(module: Path, **target: Any) -> dict[str, Any]:
    return {
        "id": "hostile",
        "version": "1.0.0",
        "target": {
            "provider": "wasm",
            "module": str(module),
            "sha256": hashlib.sha256(module.read_bytes()).hexdigest(),
            **target,
        },
        "methods": {"spin": {}, "nap": {}, "one": {}},
    }


def hostile_pool(tmp_path: Path, *, reuse: bool) -> InstancePool:
    """A pool of one instance of the hostile module, straight from the provider's parts."""
    sandbox = sandbox_of(Capabilities(), {})
    code = HOSTILE_WAT
    return InstancePool(
        "hostile",
        lambda: Compiled(
            code, hashlib.sha256(code).hexdigest(), sandbox.manifest_options, tmp_path / "cache"
        ),
        sandbox.config,
        size=1,
        reuse=reuse,
    )


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[InstancePool]:
    pool = hostile_pool(tmp_path, reuse=True)
    await pool.warm()
    try:
        yield pool
    finally:
        await pool.aclose()


async def test_a_deadline_that_ends_before_the_module_starts_still_stops_it(
    pool: InstancePool,
) -> None:
    # A deadline of zero fires about when the thread enters the module, often before:
    # libextism drops a cancel that finds no call running, and the loop would then hold the
    # pool's only slot for ever. Ten tries lose that race at least once.
    for _ in range(10):
        result = await pool.call("spin", b"null", remaining=0.0, cpu_s=None)
        assert result.cancelled_by == "deadline"
        async with asyncio.timeout(5):
            answer = await pool.call("one", b"null", remaining=2.0, cpu_s=None)
        assert answer.output == b"1", answer


async def test_a_call_whose_time_is_up_before_it_begins_never_begins(pool: InstancePool) -> None:
    # ``nap`` sleeps in a host call no cancel reaches: begun, it would hold the pool's only
    # slot NAP_SECONDS. libextism spends a cancel handled between its registering a call
    # and arming its deadline, and the call then runs on for ever: a cancel that comes
    # before the thread enters libextism must stay with the instance instead.
    for _ in range(10):
        result = await pool.call("nap", b"null", remaining=0.0, cpu_s=None)
        assert result.cancelled_by == "deadline"
        async with asyncio.timeout(5):
            answer = await pool.call("one", b"null", remaining=1.0, cpu_s=None)
        assert answer.output == b"1", answer


async def test_a_call_libextism_was_told_to_stop_takes_its_lane_s_module_with_it(
    pool: InstancePool,
) -> None:
    # libextism's timer thread moves the epoch of the module's engine when it gets to a
    # cancel, which can be after the call has returned: the next instance of that module
    # then failed its first call's set-up ("unable to clear error message", seen in CI
    # right after a call cut at its deadline). The next call gets a module of its own.
    (lane,) = pool._lanes
    result = await pool.call("spin", b"null", remaining=0.2, cpu_s=None)
    assert result.cancelled_by == "deadline"
    async with asyncio.timeout(5):
        answer = await pool.call("one", b"null", remaining=2.0, cpu_s=None)
    assert answer.output == b"1", answer
    (now,) = pool._lanes
    assert now is not lane and now.compiled is not lane.compiled


class SpentCancel:
    """What libextism does with a cancel it handled in the gap before it armed the call's
    deadline (``Instance._enter``): nothing. That gap cannot be hit at will."""

    def cancel(self) -> None:
        pass


async def test_a_cancel_libextism_lost_is_said_once(
    pool: InstancePool, caplog: pytest.LogCaptureFixture
) -> None:
    instance = pool._idle[0].instance
    assert instance is not None
    cancel_handle, instance._cancel = instance._cancel, SpentCancel()
    try:
        result = await pool.call("spin", b"null", remaining=0.1, cpu_s=None)
        assert result.cancelled_by == "deadline"
        await until(lambda: "libextism lost the cancel" in caplog.text, "lost cancel's line")
        await asyncio.sleep(wasm_pool.LOST_CANCEL_SECONDS * 1.5)
        assert caplog.text.count("libextism lost the cancel") == 1
        assert "hostile: a call of spin runs on, on a core" in caplog.text
    finally:
        cancel_handle.cancel()  # its registration is whole: the module stops now
    async with asyncio.timeout(5):
        answer = await pool.call("one", b"null", remaining=2.0, cpu_s=None)
    assert answer.output == b"1", answer


async def test_a_module_asleep_in_a_host_call_is_not_taken_for_a_lost_cancel(
    pool: InstancePool, caplog: pytest.LogCaptureFixture
) -> None:
    result = await pool.call("nap", b"null", remaining=0.1, cpu_s=None)
    assert result.cancelled_by == "deadline"
    async with asyncio.timeout(NAP_SECONDS + 5):
        answer = await pool.call("one", b"null", remaining=NAP_SECONDS + 2.0, cpu_s=None)
    assert answer.output == b"1", answer
    assert "lost the cancel" not in caplog.text


async def test_a_call_waiting_for_a_busy_instance_ends_at_its_own_deadline(module: Path) -> None:
    async with Dispatcher(manifest(plugin(module, pool_size=1))) as dispatcher:
        napping = asyncio.create_task(dispatcher.call("hostile", "nap", None, timeout=0.2))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded, match="pool_size"):
            await dispatcher.call("hostile", "one", None, timeout=0.3)
        assert time.perf_counter() - started < 1.0
        with pytest.raises(DeadlineExceeded):
            await napping


#: ``_initialize`` (run whenever an instance is made) first busy-waits START_SECONDS on
#: WASI's monotonic clock, then, given a folder (its one preopen), traps if the file
#: ``started`` is there already, creating it otherwise: the attach's instance starts,
#: every later one traps. Without a folder, every instance starts.
START_SECONDS = 2
SLOW_START_WAT = f"""(module
  (import "wasi_snapshot_preview1" "clock_time_get" (func $now (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "started")
  (func (export "_initialize") (local $until i64)
    (drop (call $now (i32.const 1) (i64.const 1) (i32.const 0)))
    (local.set $until (i64.add (i64.load (i32.const 0)) (i64.const {START_SECONDS * 1_000_000_000})))
    (loop $wait
      (drop (call $now (i32.const 1) (i64.const 1) (i32.const 0)))
      (br_if $wait (i64.lt_u (i64.load (i32.const 0)) (local.get $until))))
    ;; O_CREAT | O_EXCL; WASI's errno 20 is EEXIST
    (if (i32.eq (i32.const 20)
          (call $open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const 7) (i32.const 5)
            (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 16)))
      (then unreachable)))
  (func (export "one") (result i32) (i32.const 0))
)""".encode()


def slow_start(tmp_path: Path, *, trap_after_first: bool) -> dict[str, Any]:
    module = tmp_path / "slow-start.wat"
    module.write_bytes(SLOW_START_WAT)
    entry = plugin(module, instances="fresh", pool_size=1)
    entry["methods"] = {"one": {}}
    if trap_after_first:
        folder = tmp_path / "state"
        folder.mkdir()
        entry["capabilities"] = {"files": [{"path": str(folder), "mode": "rw"}]}
    return entry


async def test_a_call_ends_at_its_deadline_while_its_instance_is_still_starting(
    tmp_path: Path,
) -> None:
    async with Dispatcher(manifest(slow_start(tmp_path, trap_after_first=False))) as dispatcher:
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            await dispatcher.call("hostile", "one", None, timeout=0.3)
        assert time.perf_counter() - started < START_SECONDS / 2


async def test_an_attach_whose_start_code_outlasts_start_timeout_ms_fails_typed(
    tmp_path: Path,
) -> None:
    """Start code that runs on (here for START_SECONDS; it could be for ever: no cancel
    reaches it) fails the attach at ``start_timeout_ms``, so a dispatcher's start ends
    with a ``ProviderError`` naming it instead of hanging."""
    entry = slow_start(tmp_path, trap_after_first=False)
    entry["target"]["start_timeout_ms"] = 300
    started = time.perf_counter()
    with pytest.raises(ProviderError, match=r"start_timeout_ms \(300 ms\)"):
        async with Dispatcher(manifest(entry)):
            pass
    assert time.perf_counter() - started < START_SECONDS / 2


async def test_an_instance_whose_start_traps_fails_its_call_typed(tmp_path: Path) -> None:
    async with Dispatcher(manifest(slow_start(tmp_path, trap_after_first=True))) as dispatcher:
        for _ in range(2):  # the lane is not lost with the instance: the next call tries again
            with pytest.raises(ProviderError, match="cannot instantiate"):
                await dispatcher.call("hostile", "one", None, timeout=30)


async def test_closing_does_not_wait_for_a_module_asleep_in_a_host_call(module: Path) -> None:
    async with Dispatcher(manifest(plugin(module))) as dispatcher:
        with pytest.raises(DeadlineExceeded):
            await dispatcher.call("hostile", "nap", None, timeout=0.2)
        closing = time.perf_counter()
    assert time.perf_counter() - closing < NAP_SECONDS / 3


async def test_closing_three_plugins_asleep_in_host_calls_waits_for_them_at_once(
    module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each plugin's pool waits ``CLOSE_WAIT_SECONDS`` (1 s here, clear of the noise) for
    its thread asleep in a host call: the pools share nothing, so the close waits about
    once. Before: the wasm provider kept the one queue of the default, and the close
    waited for each pool in turn (2.8 s: the third's nap ends before its full wait)."""
    monkeypatch.setattr(wasm_pool, "CLOSE_WAIT_SECONDS", 1.0)
    entries = [{**plugin(module), "id": f"hostile-{n}"} for n in range(3)]
    dispatcher = Dispatcher(manifest(*entries))
    await dispatcher.start()
    try:
        naps = [dispatcher.call(each["id"], "nap", None, timeout=0.2) for each in entries]
        outcomes = await asyncio.gather(*naps, return_exceptions=True)
        assert all(isinstance(each, DeadlineExceeded) for each in outcomes), outcomes
    finally:
        started = time.perf_counter()
        await dispatcher.aclose()
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"aclose took {elapsed:.2f} s"


async def test_a_module_asleep_in_a_host_call_holds_up_neither_the_close_nor_the_exit(
    module: Path, tmp_path: Path
) -> None:
    """A process that closes its dispatcher while a module sleeps in a host call, then
    returns from ``main``, exits at once, and the sleeping call's lane is freed without
    a word once it returns (here: before the loop ends). Before, the interpreter joined
    the pool's threads at exit: the process lived as long as the module slept. Timed
    from the call to the interpreter's ``atexit`` handlers, which run once the threads it
    waits for at exit have ended: not the interpreter's start and imports, which a busy
    machine stretches past the nap (3.1 s once, with the process exiting at once)."""
    script = tmp_path / "host.py"
    script.write_text(
        f"""
import asyncio, atexit, logging, sys, time
from dispatcher import DeadlineExceeded, Dispatcher, parse_manifest
from providers.wasm import pool

logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
pool.CLOSE_WAIT_SECONDS = 0.2
entry = {plugin(module)!r}

async def main(wait_for_return):
    async with Dispatcher(parse_manifest({{"plugins": [entry]}})) as dispatcher:
        called = time.monotonic()
        atexit.register(lambda: print(f"exiting {{time.monotonic() - called:.3f}}", flush=True))
        try:
            await dispatcher.call("hostile", "nap", None, timeout=0.2)
        except DeadlineExceeded:
            pass
    if wait_for_return:
        await asyncio.sleep({NAP_SECONDS} + 0.5)  # the call returns, and its lane is freed
    print("closed", flush=True)

asyncio.run(main(sys.argv[1] == "wait"))
"""
    )
    for mode in ("exit", "wait"):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            mode,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=_env(),
        )
        output, _ = await asyncio.wait_for(process.communicate(), 30)
        text = output.decode()
        assert process.returncode == 0, text
        assert "closed" in text and "still busy" in text, text
        assert "Traceback" not in text and "ERROR" not in text, text
        if mode == "exit":  # from the call to the exit: the call's 0.2 s and the close's
            took = float(text.rpartition("exiting ")[2].split()[0])
            assert took < NAP_SECONDS - 0.5, (took, text)


def _env() -> dict[str, str]:
    """This interpreter's import path for the child (the checkout, and its SDK)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


async def test_a_call_waiting_for_a_slot_as_the_pool_closes_ends_at_once(
    pool: InstancePool,
) -> None:
    """The pool closes (its plugin detached) while one call sleeps in a host call and
    another waits for the slot: the waiting one ends as the close does, saying so. Before,
    it took the slot when the sleeper's thread came back, handed its start to a thread
    that had ended, and waited until its own deadline to fail as if it had run."""
    napping = asyncio.create_task(pool.call("nap", b"null", remaining=10.0, cpu_s=None))
    await asyncio.sleep(0.1)
    waiting = asyncio.create_task(pool.call("one", b"null", remaining=8.0, cpu_s=None))
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await pool.aclose()
    result = await waiting
    assert result.cancelled_by == "closed", result
    assert time.perf_counter() - started < 1.5
    await napping


async def test_a_call_whose_instance_starts_as_the_pool_closes_does_not_run(
    tmp_path: Path,
) -> None:
    """``fresh`` instances: the call's instance is being made when the pool closes. The
    close frees it; the call must not run on it, nor cancel it again and again. Before,
    the call handed the freed instance to a thread that had ended, waited until its
    deadline, and its cancel fired on the freed instance every second from then on."""
    pool = hostile_pool(tmp_path, reuse=False)
    await pool.warm()
    call = asyncio.create_task(pool.call("one", b"null", remaining=5.0, cpu_s=None))
    await asyncio.sleep(0)  # its instance is being made
    started = time.perf_counter()
    await pool.aclose()
    result = await call
    assert result.cancelled_by == "closed", result
    assert time.perf_counter() - started < 1.5
    assert not pool._running


async def test_a_call_waiting_for_a_version_a_reload_removes_fails_typed_at_its_detach(
    module: Path,
) -> None:
    """A reload removes version 1 while one of its calls sleeps in a host call and another
    waits for the instance: once the reload's grace is over and version 1 is detached,
    the waiting call fails at once with ``TargetUnavailable`` (retryable: it never ran).
    Before, it waited until its own deadline and failed as if it had run too long."""
    async with Dispatcher(manifest(plugin(module, pool_size=1))) as dispatcher:
        napping = asyncio.create_task(dispatcher.call("hostile", "nap", None, timeout=10))
        await asyncio.sleep(0.1)
        waiting = asyncio.create_task(dispatcher.call("hostile", "one", None, timeout=8))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        await dispatcher.reload(manifest({**plugin(module), "version": "2.0.0"}), grace=0.2)
        with pytest.raises(TargetUnavailable, match="detached"):
            await waiting
        assert time.perf_counter() - started < 2.0
        napping.cancel()
        await asyncio.gather(napping, return_exceptions=True)
        assert await dispatcher.call("hostile", "one", None, timeout=5) == 1


async def test_an_attach_given_up_while_its_start_code_runs_leaves_no_thread(
    module: Path, tmp_path: Path
) -> None:
    """A reload adding a plugin whose start code takes START_SECONDS is cancelled (its
    caller gave up) meanwhile: once the start code returns, nothing of the attach is left
    running. Before, only a start that failed or timed out closed the pool: a cancel left
    its thread waiting for jobs for as long as the process lived."""
    slow = slow_start(tmp_path, trap_after_first=False)
    slow["id"] = "slow"

    def threads() -> list[str]:
        return [each.name for each in threading.enumerate() if each.name.startswith("wasm-slow")]

    async with Dispatcher(manifest(plugin(module))) as dispatcher:
        reload = asyncio.create_task(dispatcher.reload(manifest(plugin(module), slow)))
        # Before the attach's thread: a child process runs the same start code first
        # (providers.wasm.trial), which a starved machine can make slow (CI once waited
        # past 30 s). A reload that ended instead says how.
        await until(lambda: threads() or reload.done(), "the attach's thread", timeout=90)
        if reload.done():
            pytest.fail(f"the reload ended before its attach started a thread: {reload!r}")
        await asyncio.sleep(0.2)
        reload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reload
        await until(lambda: not threads(), "the attach's thread ended", timeout=START_SECONDS + 3)
        assert await dispatcher.call("hostile", "one", None, timeout=5) == 1


async def test_a_compile_cache_that_cannot_be_written_fails_the_attach_typed(
    module: Path, tmp_path: Path
) -> None:
    """A ``cache_dir`` that cannot be made (here: under a file) is a ``ProviderError``
    naming it. Before, the OSError escaped the attach untyped."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    entry = plugin(module, cache_dir=str(blocker / "cache"))
    with pytest.raises(ProviderError, match="cannot use the compile cache"):
        async with Dispatcher(manifest(entry)):
            pass


async def test_a_job_given_to_closed_workers_is_refused_not_lost() -> None:
    """Once ``close`` told the threads to end, a job would wait for ever: refused at once."""
    workers = Workers(1, "wasm-closed")
    assert await workers.run(lambda: 1) == 1
    assert await workers.close(1.0) == []
    with pytest.raises(RuntimeError, match="have ended"):
        workers.run(lambda: 2)


async def removed(folder: Path) -> None:
    """``folder`` removed, once nothing writes into it any more: the first lane's compiled
    module may still be going into the cache as the dispatcher starts (a full run once
    failed rmtree with "Directory not empty" there)."""
    async with asyncio.timeout(10):
        while not _gone_after_removing(folder):  # noqa: ASYNC110 (a file system: no event)
            await asyncio.sleep(0.05)


def _gone_after_removing(folder: Path) -> bool:
    with contextlib.suppress(OSError):
        shutil.rmtree(folder)
    return not folder.exists()


async def test_a_lane_whose_compile_cache_is_gone_fails_its_call_as_the_hosts(
    module: Path, tmp_path: Path
) -> None:
    """A second lane compiled after the cache folder became a file: that call is a
    ``ProviderError`` naming the cache, not a failure of the module's."""
    cache = tmp_path / "cache"
    async with Dispatcher(manifest(plugin(module, cache_dir=str(cache), pool_size=2))) as d:
        await removed(cache)
        cache.write_text("")
        napping = asyncio.create_task(d.call("hostile", "nap", None, timeout=0.5))
        await asyncio.sleep(0.1)  # the first lane is asleep: the next call needs a second
        with pytest.raises(ProviderError) as refused:
            await d.call("hostile", "one", None, timeout=5)
        assert "cannot use the compile cache" in refused.value.message
        assert "the wasm module failed" not in refused.value.message
        with pytest.raises(DeadlineExceeded):
            await napping


@pytest.mark.parametrize("value", [0, -1, "soon", 1.5, None, 10**30])
def test_a_start_timeout_ms_that_is_no_positive_whole_number_is_refused_at_load(
    module: Path, value: Any
) -> None:
    entry = plugin(module, start_timeout_ms=value)
    with pytest.raises(ManifestError, match="start_timeout_ms"):
        parse_manifest({"plugins": [entry]})


def test_an_instance_made_while_a_cancel_was_on_its_way_is_dropped_not_kept(
    tmp_path: Path,
) -> None:
    """wasmtime's epoch is shared by every instance of a module: an instance made while
    the cancel of another was on its way fails every call with libextism's "unable to
    clear error message", for good. Read as the plugin's own error, it stayed in the pool
    and every call it took failed; it is the runtime's failure now (the module did not
    run), and the pool drops the instance."""
    sandbox = sandbox_of(Capabilities(), {})
    code = HOSTILE_WAT
    compiled = Compiled(
        code, hashlib.sha256(code).hexdigest(), sandbox.manifest_options, tmp_path / "cache"
    )
    try:
        failures: list[CallFailed] = []
        for _ in range(20):  # the cancel reaches the epoch late often, not always
            napping = compiled.instantiate(sandbox.config)
            napping.call("one", b"null", ends=time.monotonic() + 5)
            thread = threading.Thread(
                target=_run, args=(napping, "nap", b"null", time.monotonic() + 5)
            )
            thread.start()
            time.sleep(0.1)  # asleep in poll_oneoff, a host call
            made_meanwhile = compiled.instantiate(sandbox.config)
            napping.cancel()
            output, failure = _run(made_meanwhile, "one", b"null", time.monotonic() + 5)
            thread.join()
            if failure is not None:
                failures.append(failure)
                assert not made_meanwhile.healthy  # the pool drops it
            else:
                assert output == b"1"
            made_meanwhile.close()
            napping.close()
            if failures:
                break
        if not failures:
            pytest.skip("every cancel reached the epoch in time (20 tries)")
        assert failures[0].kind == "runtime", failures[0].message
    finally:
        compiled.close()
