"""Fleets against real servers on 127.0.0.2, .3 and .4 (all loopback on Linux).

Balancing and ejection use small HTTP servers in this process (each counts what it was
sent, and may be slow or fail); the kill test runs the example plugin in three
``dispatcher-plugin serve`` processes and kills one with SIGKILL mid-run. Assertions are
on counts, never on timings, so a loaded machine only makes the tests slower.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from dispatcher import Dispatcher, DispatchError, ManifestError, TargetUnavailable
from dispatcher.fleet import Fleet, InstanceState
from tests.conftest import ROOT, manifest
from tests.services import until

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
BIN = Path(sys.executable).parent


@dataclass
class Instance:
    """A fixed-reply envelope server on one loopback address; counts the calls it answers."""

    host: str
    delay: float = 0.0
    status: int = 200
    calls: int = 0
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
                await reader.readexactly(length)
                if head.startswith(b"GET"):
                    body, status = b'{"status": "serving"}', 200
                else:
                    self.calls += 1
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    status = self.status
                    body = orjson.dumps({"ok": True, "result": self.host})
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.connections.discard(task)


@asynccontextmanager
async def serving(*instances: Instance) -> AsyncIterator[list[Instance]]:
    servers = []
    for instance in instances:
        server = await asyncio.start_server(instance.handle, instance.host, 0)
        instance.url = f"http://{instance.host}:{server.sockets[0].getsockname()[1]}"
        servers.append(server)
    try:
        yield list(instances)
    finally:
        for server, instance in zip(servers, instances, strict=True):
            server.close()
            for task in list(instance.connections):
                task.cancel()
            await asyncio.gather(*instance.connections, return_exceptions=True)
            await server.wait_closed()


def fleet_manifest(urls: list[str], methods: dict[str, Any], **target: Any) -> Any:
    return manifest(
        {
            "id": "fleet",
            "version": "1.0.0",
            "target": {"provider": "http", "instances": [{"url": url} for url in urls], **target},
            "defaults": {"timeout_ms": 5000},
            "methods": methods,
        }
    )


def the_fleet(dispatcher: Dispatcher) -> Fleet:
    assert dispatcher.fleets is not None
    (fleet,) = dispatcher.fleets.fleets.values()
    return fleet


async def call_many(dispatcher: Dispatcher, method: str, calls: int, workers: int) -> list[Any]:
    """``calls`` calls from ``workers`` concurrent callers; results or errors."""
    results: list[Any] = []
    left = iter(range(calls))

    async def worker() -> None:
        for _ in left:
            try:
                results.append(await dispatcher.call("fleet", method, {}))
            except DispatchError as error:
                results.append(error)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return results


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


# -- the manifest ----------------------------------------------------------------------


def test_a_target_lists_instances_instead_of_or_besides_its_url() -> None:
    both = fleet_manifest(["http://127.0.0.3:2"], {"say": {}}, url="http://127.0.0.2:1")
    target = both.plugins[0].target
    assert [str(each.url) for each in target.instance_targets()] == [
        "http://127.0.0.2:1/",
        "http://127.0.0.3:2/",
    ]
    assert target.describe() == "http fleet [http://127.0.0.2:1, http://127.0.0.3:2] /invoke"
    one = fleet_manifest(["http://127.0.0.3:2"], {"say": {}}).plugins[0].target
    (single,) = one.instance_targets()
    plain = manifest(
        {
            "id": "p",
            "version": "1.0.0",
            "target": {"provider": "http", "url": "http://127.0.0.3:2"},
            "methods": {"say": {}},
        }
    )
    assert single.key == plain.plugins[0].target.key  # same pool and breaker as a plain target


@pytest.mark.parametrize(
    ("target", "where", "expected"),
    [
        ({"instances": []}, "target", "needs a url or a list of instances"),
        (
            {"url": "http://127.0.0.2:1", "instances": [{"url": "http://127.0.0.2:1"}]},
            "target",
            "listed twice",
        ),
        (
            {"instances": [{"url": "http://127.0.0.2:1"}, {"url": "http://169.254.169.254/"}]},
            "instances[1].url",
            "link-local",
        ),
        (
            {"instances": [{"url": "http://u:secret@127.0.0.2:1"}], "bearer_token": "t"},
            "target",
            "credentials twice",
        ),
        ({"instances": [{"url": "http://127.0.0.2:1"}], "balance": "random"}, "balance", ""),
        (
            {
                "instances": [{"url": "http://127.0.0.2:1"}],
                "health_check": {"interval_ms": 100, "timeout_ms": 500},
            },
            "health_check",
            "must not exceed interval_ms",
        ),
    ],
)
def test_bad_fleets_are_refused_where_they_are_written(
    target: dict[str, Any], where: str, expected: str
) -> None:
    with pytest.raises(ManifestError) as caught:
        manifest(
            {
                "id": "bad",
                "version": "1.0.0",
                "target": {"provider": "http", **target},
                "methods": {"say": {}},
            }
        )
    message = str(caught.value)
    assert where in message
    assert expected in message
    assert "secret" not in message


# -- balancing -----------------------------------------------------------------------------


async def test_round_robin_spreads_calls_evenly() -> None:
    async with serving(*(Instance(host) for host in HOSTS)) as servers:
        plugins = fleet_manifest([s.url for s in servers], {"say": {}}, balance="round_robin")
        async with Dispatcher(plugins) as dispatcher:
            results = await call_many(dispatcher, "say", 300, workers=6)
    assert sorted(results) == sorted([*HOSTS] * 100)
    assert [server.calls for server in servers] == [100, 100, 100]


async def test_least_request_sends_fewer_calls_to_a_slow_instance() -> None:
    fast_one, fast_two = Instance(HOSTS[0]), Instance(HOSTS[1])
    slow = Instance(HOSTS[2], delay=0.05)
    async with serving(fast_one, fast_two, slow):
        plugins = fleet_manifest([fast_one.url, fast_two.url, slow.url], {"say": {}})
        async with Dispatcher(plugins) as dispatcher:
            results = await call_many(dispatcher, "say", 400, workers=12)
    assert len(results) == 400
    assert not [r for r in results if isinstance(r, DispatchError)]
    # Round robin would give each a third (133); the slow one's calls pile up in flight,
    # so it loses nearly every pair it is drawn in.
    assert slow.calls < min(fast_one.calls, fast_two.calls) / 2, (slow, fast_one, fast_two)


# -- ejection and failover ----------------------------------------------------------------


async def test_with_two_of_three_failing_at_most_one_is_ejected() -> None:
    good = Instance(HOSTS[0])
    bad_one, bad_two = Instance(HOSTS[1], status=503), Instance(HOSTS[2], status=503)
    async with serving(good, bad_one, bad_two):
        plugins = fleet_manifest(
            [good.url, bad_one.url, bad_two.url],
            {"say": {}},
            outlier={"consecutive_failures": 2, "max_ejected_percent": 50},
        )
        async with Dispatcher(plugins) as dispatcher:
            results = await call_many(dispatcher, "say", 120, workers=4)
            fleet = the_fleet(dispatcher)
            states = [fleet.state_of(instance) for instance in fleet.instances]
    assert states[0] is InstanceState.HEALTHY
    assert sorted(states[1:]) == sorted([InstanceState.EJECTED, InstanceState.HEALTHY])
    assert fleet.outliers.total_ejections == 1
    assert bad_one.calls > 0
    assert bad_two.calls > 0  # the one left in service keeps being tried
    failures = [r for r in results if isinstance(r, DispatchError)]
    assert all(isinstance(f, TargetUnavailable) for f in failures)
    assert len(failures) == bad_one.calls + bad_two.calls  # sent: no failover, no retry


async def test_a_call_that_could_not_connect_fails_over_even_when_not_idempotent() -> None:
    live = Instance(HOSTS[0])
    dead = [f"http://{host}:{free_port(host)}" for host in HOSTS[1:]]  # nothing listens
    async with serving(live):
        plugins = fleet_manifest([live.url, *dead], {"say": {}})  # not idempotent, no retry
        async with Dispatcher(plugins) as dispatcher:
            results = await call_many(dispatcher, "say", 100, workers=4)
            fleet = the_fleet(dispatcher)
    assert results == [HOSTS[0]] * 100
    assert live.calls == 100
    assert fleet.failovers > 0
    assert fleet.outliers.total_ejections == 1  # 3 x 50 %: the other dead one stays in


async def test_when_every_instance_is_unreachable_the_call_fails_with_the_connect_error() -> None:
    dead = [f"http://{host}:{free_port(host)}" for host in HOSTS]
    plugins = fleet_manifest(dead, {"say": {}})
    async with Dispatcher(plugins) as dispatcher:
        with pytest.raises(TargetUnavailable) as caught:
            await dispatcher.call("fleet", "say", {})
        assert the_fleet(dispatcher).failovers == 2  # each instance tried once
    assert caught.value.details == {"stage": "connect"}
    assert "cannot connect" in caught.value.message


async def test_a_retry_goes_to_another_instance_and_an_unretried_call_does_not_move() -> None:
    failing, good = Instance(HOSTS[0], status=503), Instance(HOSTS[1])
    async with serving(failing, good):
        plugins = fleet_manifest(
            [failing.url, good.url],
            {
                "say": {
                    "idempotent": True,
                    # A budget for every call's retry: about half of them need one.
                    "retry": {"attempts": 2, "initial_backoff_ms": 1, "budget_ratio": 1},
                },
                "withdraw": {},
            },
            outlier={"consecutive_failures": 1000},  # keep the failing one in service
        )
        async with Dispatcher(plugins) as dispatcher:
            retried = await call_many(dispatcher, "say", 60, workers=1)
            sent_before = failing.calls
            once = await call_many(dispatcher, "withdraw", 60, workers=1)
    assert retried == [HOSTS[1]] * 60  # a second attempt never returns to the failing one
    assert 0 < sent_before < 60
    failed = [r for r in once if isinstance(r, DispatchError)]
    assert len(failed) == failing.calls - sent_before > 0


async def test_a_fleet_with_a_breaker_per_instance_fails_over_an_open_circuit() -> None:
    failing, good = Instance(HOSTS[0], status=503), Instance(HOSTS[1])
    async with serving(failing, good):
        plugins = fleet_manifest(
            [failing.url, good.url],
            {"say": {"breaker": {"fail_max": 2, "reset_timeout_ms": 60_000}}},
            outlier={"max_ejected_percent": 0},  # leave it to the breaker
        )
        async with Dispatcher(plugins) as dispatcher:
            results = await call_many(dispatcher, "say", 80, workers=1)
            stats = dispatcher.stats()["breakers"]
            reports = await dispatcher.health()
    assert failing.calls == 2  # then its circuit opened, and calls went to the other
    assert results.count(HOSTS[1]) == 78
    assert sorted(state["state"] for state in stats.values()) == ["closed", "open"]
    assert [report.circuit for report in reports] == ["open", "closed"]


# -- health ----------------------------------------------------------------------------------


async def test_health_reports_every_instance_with_its_state_and_breaker() -> None:
    live = Instance(HOSTS[0])
    dead = f"http://{HOSTS[1]}:{free_port(HOSTS[1])}"
    async with serving(live):
        plugins = fleet_manifest(
            [live.url, dead],
            {"say": {"breaker": {}}},
            outlier={"consecutive_failures": 1},
            balance="round_robin",  # every instance picked in 10 calls, whatever the draws
        )
        async with Dispatcher(plugins) as dispatcher:
            for _ in range(10):
                await dispatcher.call("fleet", "say", {})
            reports = await dispatcher.health()
    assert [(r.state, r.health.status, r.circuit) for r in reports] == [
        ("healthy", "serving", "closed"),
        ("ejected", "not_serving", "closed"),
    ]
    assert {r.fleet for r in reports} == {f"http fleet [{live.url}, {dead}] /invoke"}
    assert reports[1].target == f"http {dead}/invoke"


async def test_fleet_log_lines_name_an_instance_the_same_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its ejection, its probes saying it is down and up, its return: every line about
    one instance names it alike (index and address), so they can be matched."""
    live = Instance(HOSTS[0])
    late = Instance(HOSTS[1])
    port = free_port(HOSTS[1])
    late.url = f"http://{HOSTS[1]}:{port}"  # nothing listens there yet
    caplog.set_level(logging.INFO, logger="dispatcher.fleet")
    async with serving(live):
        plugins = fleet_manifest(
            [live.url, late.url],
            {"say": {}},
            outlier={"consecutive_failures": 1, "base_ejection_ms": 60_000},
            # Down after three probes: the calls below find it in service first.
            health_check={"interval_ms": 100, "timeout_ms": 100, "unhealthy_after": 3,
                          "healthy_after": 1},
            balance="round_robin",
        )  # fmt: skip
        async with Dispatcher(plugins) as dispatcher:
            fleet = the_fleet(dispatcher)
            for _ in range(4):
                await dispatcher.call("fleet", "say", {})  # one fails over: ejected
            await until(lambda: fleet.instances[1].down, "a probe seeing it down")
            server = await asyncio.start_server(late.handle, HOSTS[1], port)
            await until(lambda: fleet.state_of(fleet.instances[1]) == "healthy", "its return")
        server.close()  # the dispatcher closed its connections: their handlers have ended
        await server.wait_closed()
    name = f"instance 1 (http {late.url}/invoke)"
    about = [r.getMessage() for r in caplog.records if "instance 1" in r.getMessage()]
    assert {line.split(name, 1)[1].split(" for ")[0] for line in about} == {
        " ejected",
        " is down",
        " is up again",
        " back in service",
    }, about


# -- an instance killed mid-run and restarted -------------------------------------------


class PluginServer:
    """The example plugin in its own ``dispatcher-plugin serve`` process on ``host``."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(BIN / "dispatcher-plugin"),
                "serve",
                "echo_plugin:EchoPlugin",
                "--path",
                str(ROOT / "examples" / "python"),
                "--host",
                self.host,
                "--port",
                str(self.port),
            ]
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        pytest.fail(f"dispatcher-plugin serve on {self.url} did not come up")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def plugin_servers() -> Iterator[list[PluginServer]]:
    servers = [PluginServer(host) for host in HOSTS]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


WORKERS = 10
RATE = 500  # calls/s, all workers together


@pytest.mark.slow
async def test_an_instance_killed_mid_run_is_ejected_failed_over_and_comes_back(
    plugin_servers: list[PluginServer],
) -> None:
    victim = plugin_servers[1]
    plugins = fleet_manifest(
        [server.url for server in plugin_servers],
        {
            "say": {"idempotent": True, "retry": {"attempts": 3, "initial_backoff_ms": 5}},
            "withdraw": {},  # not idempotent: never retried
        },
        outlier={"consecutive_failures": 5, "base_ejection_ms": 30_000},
        health_check={"interval_ms": 200, "timeout_ms": 200, "unhealthy_after": 2,
                      "healthy_after": 2},
    )  # fmt: skip
    outcomes: dict[str, list[Any]] = {"say": [], "withdraw": []}
    loop = asyncio.get_running_loop()
    running = True

    async with Dispatcher(plugins) as dispatcher:
        fleet = the_fleet(dispatcher)
        dead = fleet.instances[1]

        async def worker(number: int) -> None:
            method = "say" if number % 2 else "withdraw"
            params = {"text": "hi"} if method == "say" else {"amount": 1}
            interval = WORKERS / RATE
            next_at = loop.time()
            while running:
                try:
                    outcomes[method].append(await dispatcher.call("fleet", method, params))
                except DispatchError as error:
                    outcomes[method].append(error)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - loop.time()))

        async def until(condition: Any, seconds: float) -> None:
            for _ in range(int(seconds / 0.02)):  # polls: the counters have no event to wait on
                if condition():
                    return
                await asyncio.sleep(0.02)

        workers = [asyncio.create_task(worker(number)) for number in range(WORKERS)]
        try:
            await until(lambda: dead.calls >= 50, 30)
            in_flight_at_kill = dead.in_flight
            await asyncio.to_thread(victim.kill)
            await until(lambda: fleet.state_of(dead) is not InstanceState.HEALTHY, 30)
            out_of_service = fleet.state_of(dead)
            await asyncio.sleep(0.5)  # calls go on; none should go to the dead instance
            failures_while_dead = dead.failures
            calls_while_out = dead.calls
            await asyncio.sleep(0.5)
            assert dead.calls == calls_while_out  # nothing sent to it while out of service
            await asyncio.to_thread(victim.start)
            await until(lambda: fleet.state_of(dead) is InstanceState.HEALTHY, 60)
            back = fleet.state_of(dead)
            calls_when_back = dead.calls
            await until(lambda: dead.calls >= calls_when_back + 20, 30)
            await until(lambda: len(outcomes["say"]) >= 1000, 30)  # enough to read 99.9 %
        finally:
            running = False
            await asyncio.gather(*workers)

    assert out_of_service in (InstanceState.EJECTED, InstanceState.DOWN)
    # Out of service after at most consecutive_failures failed attempts, besides the
    # attempts already under way towards it (at most one per worker).
    assert failures_while_dead <= 5 + in_flight_at_kill + WORKERS
    assert back is InstanceState.HEALTHY
    assert dead.calls >= calls_when_back + 20  # it takes calls again

    said = outcomes["say"]
    said_failed = [o for o in said if isinstance(o, DispatchError)]
    assert len(said) >= 1000
    assert len(said_failed) <= len(said) * 0.001, said_failed
    withdrawn = outcomes["withdraw"]
    withdraw_failed = [o for o in withdrawn if isinstance(o, DispatchError)]
    # A non-idempotent call fails only if it had reached the dead instance: a call that
    # could not connect moved on, so no failure is a connect failure.
    assert all(o.details.get("stage") != "connect" for o in withdraw_failed), withdraw_failed
    assert len(withdraw_failed) <= in_flight_at_kill + WORKERS
    print(
        f"say {len(said)} calls, {len(said_failed)} failed; withdraw {len(withdrawn)} calls,"
        f" {len(withdraw_failed)} failed; failovers {fleet.failovers}; dead instance"
        f" {failures_while_dead} failures, {in_flight_at_kill} in flight at the kill"
    )


# -- the CLI --------------------------------------------------------------------------------


def test_dispatcher_health_shows_every_instance(tmp_path: Path) -> None:
    server = PluginServer(HOSTS[0])
    server.start()
    try:
        server.wait_ready()
        dead = f"http://{HOSTS[1]}:{free_port(HOSTS[1])}"
        path = tmp_path / "plugins.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "version": 1,
                    "plugins": [
                        {
                            "id": "echo",
                            "version": "1.0.0",
                            "target": {
                                "provider": "http",
                                "instances": [{"url": server.url}, {"url": dead}],
                            },
                            "methods": {"say": {"breaker": {}}},
                        }
                    ],
                }
            )
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        # A long probe timeout: on a loaded machine the live instance must not time out.
        command = [str(BIN / "dispatcher"), "-m", str(path), "health", "--timeout", "30"]
        table = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
        as_json = subprocess.run(
            [*command, "-o", "json"], capture_output=True, text=True, env=env, timeout=60
        )
    finally:
        server.stop()
    assert table.returncode == 1, table.stderr  # one instance is not serving
    header, *lines = table.stdout.splitlines()
    rows = [line for line in lines if ": NOT_SERVING: " not in line]  # the table's
    assert "STATE" in header
    assert len(rows) == 2
    assert [line for line in lines if line not in rows] == [
        f"echo@1.0.0 http {dead}/invoke: NOT_SERVING: {reports_detail(as_json.stdout, 1)}"
    ]
    assert server.url in rows[0] and " healthy " in rows[0] and " serving " in rows[0]
    assert dead in rows[1] and "not_serving" in rows[1]
    reports = json.loads(as_json.stdout)
    assert [(r["target"], r["state"], r["status"], r["circuit"]) for r in reports] == [
        (f"http {server.url}/invoke", "healthy", "serving", "closed"),
        (f"http {dead}/invoke", "healthy", "not_serving", "closed"),
    ]
    assert all(r["fleet"].startswith("http fleet [") for r in reports)


def reports_detail(health_json: str, index: int) -> str:
    detail: str = json.loads(health_json)[index]["detail"]
    return detail


# -- the hot path of a target with one instance ----------------------------------------------


async def test_a_target_with_one_instance_gets_no_fleet_step() -> None:
    from dispatcher.fleet import FleetStep

    for target in (
        {"url": "http://127.0.0.2:1"},
        {"instances": [{"url": "http://127.0.0.2:1"}]},
    ):
        plugins = manifest(
            {
                "id": "one",
                "version": "1.0.0",
                "target": {"provider": "http", **target},
                "methods": {"say": {}},
            }
        )
        async with Dispatcher(plugins) as dispatcher:
            route = dispatcher._routes["one"]["say"]
            assert not isinstance(route.invoke, FleetStep)
            assert dispatcher.fleets is not None and not dispatcher.fleets.fleets


async def test_a_fleet_a_reload_adds_is_health_checked_and_one_it_removes_is_let_go(
    plugin_servers: list[PluginServer],
) -> None:
    fleet_entry = fleet_manifest(
        [server.url for server in plugin_servers],
        {"say": {}},
        health_check={"interval_ms": 100, "timeout_ms": 100, "unhealthy_after": 1},
    ).plugins[0]
    local = manifest(
        {
            "id": "local",
            "version": "1.0.0",
            "target": {"provider": "local", "entrypoint": "echo_plugin:EchoPlugin",
                       "path": str(ROOT / "examples" / "python")},
            "methods": {"say": {}},
        }
    )  # fmt: skip
    async with Dispatcher(local) as dispatcher:
        assert dispatcher.fleets is not None
        await dispatcher.reload(local.model_copy(update={"plugins": [*local.plugins, fleet_entry]}))
        fleet = the_fleet(dispatcher)
        assert await dispatcher.call("fleet", "say", {"text": "hi"})
        victim = fleet.instances[0]
        await asyncio.to_thread(plugin_servers[0].kill)
        # No call goes to it: only the active health checks the reload started can see it.
        for _ in range(300):
            if fleet.state_of(victim) is InstanceState.DOWN:
                break
            await asyncio.sleep(0.02)
        assert fleet.state_of(victim) is InstanceState.DOWN
        tasks_before = {task.get_name() for task in asyncio.all_tasks()}
        assert any(name.startswith("health checks of") for name in tasks_before)
        await dispatcher.reload(local, grace=1.0)
        assert dispatcher.fleets.fleets == {}
        assert not any(
            task.get_name().startswith("health checks of") for task in asyncio.all_tasks()
        )
        assert await dispatcher.call("local", "say", {"text": "still"})
