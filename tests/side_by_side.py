"""The cases of one parametrized test run side by side, so the suite waits their time once.

Some tests wait real time in every SDK: a window of refused tries counted by etcd, a retry
pace, a cap on a stop hook. Run one after the other, the suite waits that time once per
SDK; run side by side, once. A case may run beside the others when it has everything of
its own (its plugin process, its etcd, its port in front of that etcd): its scenario is a
function of the test's parameters that starts all of it and ends all of it.

The ``side_by_side`` fixture (module scope, ``tests/conftest.py``) is a ``SideBySide``. A
case's test item calls ``side_by_side.run(request, scenario)``: the first case of a test
to do so starts the scenario of every case of that test pytest selected (``-k``, ``-m``,
``--lf`` are heeded: only the session's items run), at most ``at_once`` together. Each
item then waits for its own case and raises what it raised, with its traceback: a failure
is reported under the case's own id (its SDK), as before, and one case failing stops none
of the others.

A scenario that blocks (``time.sleep``, a subprocess waited for) runs in a thread of its
own. An async one (``run_async``, from an async test) runs as a task in one event loop the
module's cases share, in a thread of its own, as ``asyncio.gather`` would run them: gRPC's
asyncio client binds a process-wide poller to every loop that uses it, and a loop per case,
closed when its case ends, would be sent the late events of its channels.

The bounds a scenario asserts are those its case asserted alone, from the same windows;
cases that load the machine (plugin processes starting on 2 cores) are given an
``at_once`` below their number.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

__all__ = ["SideBySide"]


class SideBySide:
    """The cases of each test of a module, started together when the first is asked for."""

    def __init__(self) -> None:
        self._tests: dict[tuple[int, str], _Cases] = {}
        self._loop: _LoopThread | None = None

    def __repr__(self) -> str:
        return f"SideBySide({', '.join(map(repr, self._tests.values()))})"

    def __enter__(self) -> SideBySide:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Waits for the cases under way (each is bounded) and drops those not begun (the
        session stopped by ``-x``, say); then ends the loop of the async ones."""
        for cases in self._tests.values():
            cases.close()
        if self._loop is not None:
            self._loop.close()

    def run(
        self, request: pytest.FixtureRequest, scenario: Callable[..., Any], *, at_once: int = 5
    ) -> Any:
        """What ``scenario`` returned for ``request``'s case; raises what it raised."""
        __tracebackhide__ = True  # a failure shows the scenario's frames, not these
        return self._future_of(request.node, scenario, at_once).result()

    async def run_async(
        self,
        request: pytest.FixtureRequest,
        scenario: Callable[..., Awaitable[Any]],
        *,
        at_once: int = 5,
    ) -> Any:
        """``run`` for an async ``scenario``, from an async test."""
        __tracebackhide__ = True
        return await asyncio.wrap_future(self._future_of(request.node, scenario, at_once))

    def _future_of(
        self, item: pytest.Item, scenario: Callable[..., Any], at_once: int
    ) -> concurrent.futures.Future[Any]:
        name = getattr(item, "originalname", item.name)
        key = (id(item.parent), name)
        cases = self._tests.get(key)
        if cases is None:
            siblings = [
                each
                for each in item.session.items
                if each.parent is item.parent and getattr(each, "originalname", None) == name
            ]
            if inspect.iscoroutinefunction(scenario):
                if self._loop is None:
                    self._loop = _LoopThread()
                cases = _Tasks(scenario, at_once, self._loop)
            else:
                cases = _Threads(scenario, at_once)
            self._tests[key] = cases
            for sibling in siblings:
                cases.future_of(sibling)
        return cases.future_of(item)


class _Cases(abc.ABC):
    """The cases of one test, each a future of its scenario."""

    def __init__(self, scenario: Callable[..., Any], at_once: int) -> None:
        self._scenario = scenario
        self._at_once = at_once
        self._futures: dict[str, concurrent.futures.Future[Any]] = {}

    def __repr__(self) -> str:
        futures = self._futures.values()
        return (
            f"<{self._scenario.__name__}: {len(self._futures)} cases,"
            f" {sum(each.done() for each in futures)} done, at most {self._at_once} at once>"
        )

    def future_of(self, item: pytest.Item) -> concurrent.futures.Future[Any]:
        if item.nodeid not in self._futures:
            parameters = dict(item.callspec.params)  # type: ignore[attr-defined]
            self._futures[item.nodeid] = self._submit(parameters)
        return self._futures[item.nodeid]

    @abc.abstractmethod
    def _submit(self, parameters: dict[str, Any]) -> concurrent.futures.Future[Any]:
        """The scenario started with ``parameters`` (or waiting for a slot)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Waits for the cases begun; drops the others."""


class _Threads(_Cases):
    """Blocking scenarios, each in a thread of its own."""

    def __init__(self, scenario: Callable[..., Any], at_once: int) -> None:
        super().__init__(scenario, at_once)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=at_once, thread_name_prefix=scenario.__name__
        )

    def _submit(self, parameters: dict[str, Any]) -> concurrent.futures.Future[Any]:
        return self._executor.submit(self._scenario, **parameters)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class _Tasks(_Cases):
    """Async scenarios, each a task in the module's loop."""

    def __init__(self, scenario: Callable[..., Any], at_once: int, loop: _LoopThread) -> None:
        super().__init__(scenario, at_once)
        self._loop = loop
        self._slots = asyncio.Semaphore(at_once)  # bound to the loop at its first use
        self._closing = False

    async def _limited(self, parameters: dict[str, Any]) -> Any:
        __tracebackhide__ = True
        async with self._slots:
            if self._closing:  # dropped unrun; its coroutine never made, so none warns
                return None
            return await self._scenario(**parameters)

    def _submit(self, parameters: dict[str, Any]) -> concurrent.futures.Future[Any]:
        return self._loop.submit(self._limited(parameters))

    def close(self) -> None:
        self._closing = True
        concurrent.futures.wait(self._futures.values())


class _LoopThread:
    """An event loop running in a thread of its own until ``close()``."""

    def __init__(self) -> None:
        started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

        async def serve() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            # Threads enough for every case's asyncio.to_thread at once: a loop's default
            # pool (cores + 4) is sized for one test, and would queue a case behind others.
            self._loop.set_default_executor(
                concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="case")
            )
            started.set()
            await self._stop.wait()

        self._thread = threading.Thread(
            target=asyncio.run, args=(serve(),), name="side-by-side-loop", daemon=True
        )
        self._thread.start()
        if not started.wait(timeout=60):
            raise RuntimeError("the side-by-side event loop did not start within 60 s")

    def submit(self, coroutine: Any) -> concurrent.futures.Future[Any]:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
