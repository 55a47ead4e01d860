"""The cases of one parametrized test run side by side, so the suite waits their time once.

Some tests wait real time in every SDK: a window of refused tries counted by etcd, a retry
pace, a cap on a stop hook. Run one after the other, the suite waits that time once per
SDK; run side by side, once. A case may run beside the others when it has everything of
its own (its plugin process, its etcd, its port in front of that etcd): its scenario is a
function of the test's parameters that starts all of it and ends all of it.

The ``side_by_side`` fixture (module scope, ``tests/conftest.py``) is a ``SideBySide``. A
case's test item calls ``side_by_side.run(request, scenario)``: the first case of a test
to do so starts the scenario of every case of that test pytest selected (``-k``, ``-m``,
``--lf`` are heeded: only the session's items run), each in a thread of its own, at most
``at_once`` together. Each item then waits for its own case and raises what it raised,
with its traceback: a failure is reported under the case's own id (its SDK), as before,
and one case failing stops none of the others.

An async scenario runs in an event loop of its own thread (``run_async`` awaits it from an
async test); nothing it makes (subprocesses, servers, a ``Dispatcher``) is shared with the
test's loop.

The bounds a scenario asserts are those its case asserted alone, from the same windows;
cases that load the machine (plugin processes starting on 2 cores) are given an
``at_once`` below their number.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from collections.abc import Callable
from typing import Any

import pytest

__all__ = ["SideBySide"]


class SideBySide:
    """The cases of each test of a module, started together when the first is asked for."""

    def __init__(self) -> None:
        self._tests: dict[tuple[int, str], _Cases] = {}

    def __repr__(self) -> str:
        return f"SideBySide({', '.join(map(repr, self._tests.values()))})"

    def __enter__(self) -> SideBySide:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Waits for the cases under way (each is bounded) and drops those not begun (the
        session stopped by ``-x``, say)."""
        for cases in self._tests.values():
            cases.close()

    def run(
        self, request: pytest.FixtureRequest, scenario: Callable[..., Any], *, at_once: int = 5
    ) -> Any:
        """What ``scenario`` returned for ``request``'s case; raises what it raised."""
        __tracebackhide__ = True  # a failure shows the scenario's frames, not these
        return self._future_of(request.node, scenario, at_once).result()

    async def run_async(
        self, request: pytest.FixtureRequest, scenario: Callable[..., Any], *, at_once: int = 5
    ) -> Any:
        """``run`` from an async test: its loop goes on while the case runs."""
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
            self._tests[key] = cases = _Cases(scenario, at_once, siblings)
        return cases.future_of(item)


class _Cases:
    """The cases of one test, each a future of its scenario."""

    def __init__(
        self, scenario: Callable[..., Any], at_once: int, items: list[pytest.Item]
    ) -> None:
        self._scenario = scenario
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=at_once, thread_name_prefix=scenario.__name__
        )
        self._at_once = at_once
        self._futures = {item.nodeid: self._submit(item) for item in items}

    def __repr__(self) -> str:
        futures = self._futures.values()
        return (
            f"<{self._scenario.__name__}: {len(self._futures)} cases,"
            f" {sum(each.running() for each in futures)} running,"
            f" {sum(each.done() for each in futures)} done, at most {self._at_once} at once>"
        )

    def future_of(self, item: pytest.Item) -> concurrent.futures.Future[Any]:
        if item.nodeid not in self._futures:  # not among the session's items at the start
            self._futures[item.nodeid] = self._submit(item)
        return self._futures[item.nodeid]

    def _submit(self, item: pytest.Item) -> concurrent.futures.Future[Any]:
        parameters = dict(item.callspec.params)  # type: ignore[attr-defined]
        return self._executor.submit(_run, self._scenario, parameters)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _run(scenario: Callable[..., Any], parameters: dict[str, Any]) -> Any:
    """``scenario`` with ``parameters``, in this thread; an async one in a loop of its own
    (its coroutine made here: one made for a case dropped unrun would warn)."""
    __tracebackhide__ = True
    if inspect.iscoroutinefunction(scenario):
        return asyncio.run(scenario(**parameters))
    return scenario(**parameters)
