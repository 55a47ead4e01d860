"""Hedged calls against real HTTP servers on 127.0.0.2, .3 and .4 (loopback on Linux).

The servers are small envelope servers in this process: each counts the requests it is
sent and the request ids in them, may be slow on every n-th request, and notices a client
that hangs up while it is being slow (the dispatcher cancelling a losing attempt). Timing
asserts compare the same run with and without hedging and leave a wide margin, so a
loaded machine makes the test slower, not red.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from dispatcher import Dispatcher, DispatchError, ManifestError, TargetUnavailable
from dispatcher.policies.hedge import LatencyWindow
from tests.conftest import manifest
from tests.test_fleet import HOSTS, fleet_manifest, serving, the_fleet


@dataclass
class Server:
    """An envelope server on one loopback address: ``fast`` seconds per request, ``slow``
    on every ``slow_every``-th one; answers 503 when ``status`` says so."""

    host: str
    fast: float = 0.005
    slow: float = 0.5
    slow_every: int = 0  # 0: never slow
    status: int = 200
    calls: int = 0
    disconnects: int = 0
    request_ids: list[str] = field(default_factory=list)
    url: str = ""
    connections: set[asyncio.Task[Any]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                if head.startswith(b"GET"):
                    answer, status = b'{"status": "serving"}', 200
                else:
                    self.calls += 1
                    self.request_ids.append(orjson.loads(body)["context"]["request_id"])
                    slow = self.slow_every and self.calls % self.slow_every == 0
                    try:  # a client that hangs up meanwhile is a cancelled attempt
                        hung_up = await asyncio.wait_for(
                            reader.read(1), self.slow if slow else self.fast
                        )
                    except TimeoutError:
                        hung_up = None
                    if hung_up == b"":
                        self.disconnects += 1
                        return
                    status = self.status
                    answer = orjson.dumps({"ok": True, "result": self.host})
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Length: {len(answer)}\r\n\r\n".encode()
                    + answer
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.connections.discard(task)


async def timed_calls(
    call: Callable[[], Awaitable[Any]], calls: int, workers: int
) -> tuple[list[float], list[Any]]:
    """Latencies (seconds) and results of ``calls`` calls from ``workers`` callers."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    results: list[Any] = []
    left = iter(range(calls))

    async def worker() -> None:
        for _ in left:
            started = loop.time()
            try:
                results.append(await call())
            except DispatchError as error:
                results.append(error)
            latencies.append(loop.time() - started)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return latencies, results


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100, method="inclusive")[98]


def hedge_tasks_left() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").startswith("HedgeStep")
    ]


# -- the tail, the extra load, the losers -----------------------------------------------------


@pytest.mark.slow
async def test_hedging_cuts_the_tail_of_a_sometimes_slow_instance_for_little_extra_load() -> None:
    sometimes_slow = Server(HOSTS[0], slow_every=20)  # 5 % of its calls take 500 ms
    servers = [sometimes_slow, Server(HOSTS[1]), Server(HOSTS[2])]
    calls = 450
    async with serving(*servers):
        plugins = fleet_manifest(
            [server.url for server in servers],
            {
                "plain": {"idempotent": True},
                "hedged": {"idempotent": True, "hedge": {"after_ms": 50}},
            },
            balance="round_robin",  # a third of the calls to the slow one, every run
        )
        async with Dispatcher(plugins) as dispatcher:

            def method(name: str) -> Callable[[], Awaitable[Any]]:
                return lambda: dispatcher.call("fleet", name, {})

            plain, plain_results = await timed_calls(method("plain"), calls, workers=4)
            sent_before = sum(server.calls for server in servers)
            hedged, hedged_results = await timed_calls(method("hedged"), calls, workers=4)
            sent_hedged = sum(server.calls for server in servers) - sent_before
            stats = dispatcher.stats()["hedges"]["fleet@1.0.0.hedged"]
            fleet = the_fleet(dispatcher)
            in_flight = [instance.in_flight for instance in fleet.instances]
            left = hedge_tasks_left()
    assert not [r for r in plain_results + hedged_results if isinstance(r, DispatchError)]
    extra_load = sent_hedged / calls - 1
    print(
        f"p99 without hedging {p99(plain) * 1000:.0f} ms, with {p99(hedged) * 1000:.0f} ms;"
        f" p50 {statistics.median(plain) * 1000:.1f} / {statistics.median(hedged) * 1000:.1f} ms;"
        f" extra load {extra_load:.1%}; {stats}"
    )
    assert p99(plain) >= 0.4  # ~1.7 % of the calls took 500 ms
    assert p99(hedged) < 0.2  # hedged after 50 ms: ~55 ms; slack for a loaded machine
    assert 0 < extra_load <= 0.10  # ~1.7 % expected
    assert stats["sent"] == sent_hedged - calls
    assert 1 <= stats["won"] <= stats["sent"]
    assert stats["refused_by_budget"] == 0
    # Losers were cancelled: the slow server saw its client hang up, nothing is in flight,
    # no attempt task is left.
    assert sometimes_slow.disconnects >= stats["won"] - 1
    assert in_flight == [0, 0, 0]
    assert left == []
    # Never twice to the same instance: no server saw a request id twice.
    for server in servers:
        assert len(server.request_ids) == len(set(server.request_ids))


async def test_a_hedge_goes_to_another_instance_and_never_to_one_already_tried() -> None:
    slow = [Server(host, fast=0.08) for host in HOSTS[:2]]  # every call is slow: all hedged
    async with serving(*slow):
        plugins = fleet_manifest(
            [server.url for server in slow],
            {
                "say": {
                    "idempotent": True,
                    "hedge": {"after_ms": 10, "max_attempts": 3},  # only 2 instances
                    "retry": {"attempts": 1, "budget_ratio": 1},
                }
            },
        )
        async with Dispatcher(plugins) as dispatcher:
            _, results = await timed_calls(lambda: dispatcher.call("fleet", "say", {}), 20, 2)
            stats = dispatcher.stats()["hedges"]["fleet@1.0.0.say"]
            left = hedge_tasks_left()
    assert sorted(set(results)) == sorted(HOSTS[:2])
    assert stats["sent"] == 20  # one hedge per call: a third attempt has nowhere to go
    for server in slow:
        assert len(server.request_ids) == len(set(server.request_ids))
    both = set(slow[0].request_ids) & set(slow[1].request_ids)
    assert len(both) == 20  # each call went to both instances, once each
    assert left == []


async def test_no_hedge_when_the_retry_budget_is_spent() -> None:
    slow = [Server(host, fast=0.06) for host in HOSTS]
    async with serving(*slow):
        plugins = fleet_manifest(
            [server.url for server in slow],
            {
                "say": {
                    "idempotent": True,
                    "hedge": {"after_ms": 5},
                    # A budget of one token that first attempts never refill.
                    "retry": {"attempts": 1, "budget_ratio": 0},
                }
            },
        )
        async with Dispatcher(plugins) as dispatcher:
            for _ in range(8):
                await dispatcher.call("fleet", "say", {})
            stats = dispatcher.stats()
    hedges = stats["hedges"]["fleet@1.0.0.say"]
    assert hedges["sent"] == 1
    assert hedges["refused_by_budget"] == 7
    assert sum(server.calls for server in slow) == 9
    (budget,) = stats["retry_budgets"].values()
    assert budget["spent"] == 1 and budget["refused"] == 7


async def test_a_retry_after_a_hedged_attempt_failed_goes_to_another_instance() -> None:
    # The failing attempt ran in a task of its own; the instance it failed on still
    # steers the retry's next attempt away from it.
    failing, good = Server(HOSTS[0], status=503), Server(HOSTS[1])
    async with serving(failing, good):
        plugins = fleet_manifest(
            [failing.url, good.url],
            {
                "say": {
                    "idempotent": True,
                    "hedge": {"after_ms": 2000},  # never fires here
                    "retry": {"attempts": 2, "initial_backoff_ms": 1, "budget_ratio": 1},
                }
            },
            outlier={"consecutive_failures": 1000},  # keep the failing one in service
        )
        async with Dispatcher(plugins) as dispatcher:
            _, results = await timed_calls(lambda: dispatcher.call("fleet", "say", {}), 40, 1)
    assert results == [HOSTS[1]] * 40
    assert 0 < failing.calls < 40


async def test_when_every_attempt_fails_the_last_error_goes_up() -> None:
    failing = [Server(host, fast=0.03, status=503) for host in HOSTS[:2]]
    async with serving(*failing):
        plugins = fleet_manifest(
            [server.url for server in failing],
            {"say": {"idempotent": True, "hedge": {"after_ms": 5}}},
            outlier={"consecutive_failures": 1000},
        )
        async with Dispatcher(plugins) as dispatcher:
            with pytest.raises(TargetUnavailable):
                await dispatcher.call("fleet", "say", {})
            stats = dispatcher.stats()["hedges"]["fleet@1.0.0.say"]
            in_flight = [instance.in_flight for instance in the_fleet(dispatcher).instances]
    assert stats["sent"] == 1
    assert [server.calls for server in failing] == [1, 1]
    assert in_flight == [0, 0]


async def test_a_percentile_hedge_learns_its_delay_from_recent_calls() -> None:
    servers = [Server(host, fast=0.02) for host in HOSTS]
    async with serving(*servers):
        plugins = fleet_manifest(
            [server.url for server in servers],
            {"say": {"idempotent": True, "hedge": {"after_percentile": 95, "after_ms": 500}}},
        )
        async with Dispatcher(plugins) as dispatcher:
            before = dispatcher.stats()["hedges"]["fleet@1.0.0.say"]["delay_ms"]
            await timed_calls(lambda: dispatcher.call("fleet", "say", {}), 60, 3)
            after = dispatcher.stats()["hedges"]["fleet@1.0.0.say"]["delay_ms"]
    assert before == 500  # after_ms until enough samples
    assert 20 <= after < 500  # ~p95 of 20 ms calls


def test_the_latency_window_reads_its_percentile_with_a_floor_of_samples() -> None:
    window = LatencyWindow(95)
    for _ in range(LatencyWindow.MIN_SAMPLES - 1):
        window.record(0.01)
    assert window.value is None
    window.record(0.01)
    assert window.value == 0.01
    for index in range(1000):  # a ring: only the last WINDOW samples count
        window.record(1.0 if index % 10 == 0 else 0.002)
    assert window.value == 1.0  # 10 % slow: p95 is slow
    for _ in range(LatencyWindow.WINDOW):
        window.record(0.002)
    assert window.value == 0.002


# -- the manifest -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "where", "expected"),
    [
        ({"hedge": {"after_ms": 50}}, "say.hedge", "needs 'idempotent: true'"),
        (
            {"idempotent": True, "hedge": {"after_ms": 50}, "batch": {}},
            "say.hedge",
            "do not combine",
        ),
        ({"idempotent": True, "hedge": {}}, "say.hedge", "needs 'after_ms' or 'after_percentile'"),
        ({"idempotent": True, "hedge": {"after_ms": 5, "max_attempts": 4}}, "max_attempts", ""),
        ({"idempotent": True, "hedge": {"after_percentile": 100}}, "after_percentile", ""),
    ],
)
def test_hedges_that_cannot_apply_are_refused(
    method: dict[str, Any], where: str, expected: str
) -> None:
    with pytest.raises(ManifestError) as caught:
        fleet_manifest(["http://127.0.0.2:1", "http://127.0.0.3:1"], {"say": method})
    assert where in str(caught.value)
    assert expected in str(caught.value)


def test_a_hedge_on_a_target_with_one_instance_is_refused() -> None:
    with pytest.raises(ManifestError) as caught:
        manifest(
            {
                "id": "one",
                "version": "1.0.0",
                "target": {"provider": "http", "url": "http://127.0.0.2:1"},
                "methods": {"say": {"idempotent": True, "hedge": {"after_ms": 50}}},
            }
        )
    assert "methods.say.hedge" in str(caught.value)
    assert "several instances" in str(caught.value)


async def test_a_hedge_in_the_defaults_applies_only_to_idempotent_methods() -> None:
    plugins = manifest(
        {
            "id": "fleet",
            "version": "1.0.0",
            "target": {
                "provider": "http",
                "instances": [{"url": "http://127.0.0.2:1"}, {"url": "http://127.0.0.3:1"}],
            },
            "defaults": {"hedge": {"after_ms": 50}},
            "methods": {"say": {"idempotent": True}, "withdraw": {}},
        }
    )
    async with Dispatcher(plugins) as dispatcher:
        assert list(dispatcher.stats()["hedges"]) == ["fleet@1.0.0.say"]


# -- hostile: callers that give up, deadlines shorter than the delay --------------------------


async def test_a_caller_that_gives_up_leaves_no_attempt_running() -> None:
    slow = [Server(host, fast=2.0) for host in HOSTS[:2]]
    async with serving(*slow):
        plugins = fleet_manifest(
            [server.url for server in slow],
            {"say": {"idempotent": True, "hedge": {"after_ms": 10}}},
        )
        async with Dispatcher(plugins) as dispatcher:
            with pytest.raises(TimeoutError):  # the host's own timeout cancels the call
                await asyncio.wait_for(dispatcher.call("fleet", "say", {}), 0.3)
            left = hedge_tasks_left()
            in_flight = [instance.in_flight for instance in the_fleet(dispatcher).instances]
            stats = dispatcher.stats()
            for _ in range(100):  # the servers notice the hang-ups on their next read
                if sum(server.disconnects for server in slow) == 2:
                    break
                await asyncio.sleep(0.01)
    assert left == []
    assert in_flight == [0, 0]
    assert stats["hedges"]["fleet@1.0.0.say"]["sent"] == 1
    assert stats["dispatcher"]["calls_in_flight"] == 0
    assert [server.disconnects for server in slow] == [1, 1]


async def test_no_hedge_once_the_deadline_has_passed_and_the_deadline_error_goes_up() -> None:
    slow = [Server(host, fast=2.0) for host in HOSTS]
    async with serving(*slow):
        plugins = fleet_manifest(
            [server.url for server in slow],
            {"say": {"idempotent": True, "hedge": {"after_ms": 150, "max_attempts": 3}}},
        )
        async with Dispatcher(plugins) as dispatcher:
            with pytest.raises(DispatchError) as caught:
                await dispatcher.call("fleet", "say", {}, timeout=0.2)
            stats = dispatcher.stats()["hedges"]["fleet@1.0.0.say"]
            left = hedge_tasks_left()
    assert caught.value.type == "deadline_exceeded"
    # One hedge at 150 ms (none if a loaded loop woke after the deadline); the next would
    # have been at 300 ms, past the 200 ms deadline: never sent.
    assert stats["sent"] <= 1
    assert sum(server.calls for server in slow) == 1 + stats["sent"]
    assert left == []
