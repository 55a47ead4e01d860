"""gRPC fleets against real plugin services on 127.0.0.2, .3 and .4, one port for all.

Each instance is the Python SDK's gRPC server (``tests/plugins/fleet_grpc_plugin.py
serve``) in its own process, answering with the host it serves on, so counts say which
instance took each call; a kill is a real SIGKILL. Assertions are on counts and on which
errors carry the connect marker, never on timings.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dispatcher import Dispatcher, DispatchError, ManifestError, TargetUnavailable
from dispatcher.fleet import Fleet, InstanceState
from providers.grpc import GrpcProvider, GrpcTarget
from providers.invocation import Invocation
from tests.conftest import ROOT, manifest
from tests.services import port_free_on

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
PLUGIN = ROOT / "tests" / "plugins" / "fleet_grpc_plugin.py"
BIN = Path(sys.executable).parent


class GrpcInstance:
    """The fleet plugin served over gRPC by its own process on ``host:port``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.address = f"{host}:{port}"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        environment = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LINCHKIT_PLUGIN")},
            "FLEET_INSTANCE": self.host,
            "PYTHONPATH": os.pathsep.join(sys.path),
        }
        self.process = subprocess.Popen(
            [sys.executable, str(PLUGIN), "serve", "--address", self.address],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=environment,
        )

    def wait_ready(self) -> None:
        """The handshake line is printed once the server listens."""
        assert self.process is not None and self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.endswith("|grpc|"):
            pytest.fail(f"the gRPC plugin on {self.address} did not start: {line!r}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture
def instances() -> Iterator[list[GrpcInstance]]:
    port = port_free_on(*HOSTS)
    servers = [GrpcInstance(host, port) for host in HOSTS]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def dead_address(host: str) -> str:
    """An address on ``host`` where nothing listens: connections to it are refused."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return f"{host}:{probe.getsockname()[1]}"


METHODS: dict[str, Any] = {
    "whoami": {"idempotent": True, "retry": {"attempts": 3, "initial_backoff_ms": 5}},
    "withdraw": {},  # not idempotent: never retried
    "sleep": {},
    "config": {},
}


def fleet_manifest(addresses: list[str], **target: Any) -> Any:
    return manifest(
        {
            "id": "fleet",
            "version": "1.0.0",
            "target": {
                "provider": "grpc",
                "instances": [{"address": address} for address in addresses],
                **target,
            },
            "defaults": {"timeout_ms": 10_000},
            "methods": METHODS,
        }
    )


def the_fleet(dispatcher: Dispatcher) -> Fleet:
    assert dispatcher.fleets is not None
    (fleet,) = dispatcher.fleets.fleets.values()
    return fleet


async def call_many(
    dispatcher: Dispatcher, method: str, params: dict[str, Any], calls: int, workers: int
) -> list[Any]:
    results: list[Any] = []
    left = iter(range(calls))

    async def worker() -> None:
        for _ in left:
            try:
                results.append(await dispatcher.call("fleet", method, params))
            except DispatchError as error:
                results.append(error)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return results


# -- the manifest ----------------------------------------------------------------------


def test_a_grpc_target_lists_instances_instead_of_or_besides_its_address() -> None:
    both = fleet_manifest(["127.0.0.3:2"], address="127.0.0.2:1").plugins[0].target
    assert [each.address for each in both.instance_targets()] == ["127.0.0.2:1", "127.0.0.3:2"]
    assert both.describe() == "grpc fleet [127.0.0.2:1, 127.0.0.3:2]"
    assert [str(d) for d in both.destinations()] == ["127.0.0.2:1", "127.0.0.3:2"]
    assert [d.field for d in both.destinations()] == ["address", "instances[0].address"]
    assert both.is_fleet()
    assert both.fleet_settings().balance == "least_request"

    fleet = fleet_manifest(["127.0.0.3:2", "127.0.0.4:2"], balance="round_robin").plugins[0]
    single, _ = fleet.target.instance_targets()
    plain = manifest(
        {
            "id": "p",
            "version": "1.0.0",
            "target": {"provider": "grpc", "address": "127.0.0.3:2"},
            "methods": {"whoami": {}},
        }
    )
    assert single.key == plain.plugins[0].target.key  # one channel and breaker with it
    assert single.describe() == "grpc 127.0.0.3:2"
    assert single.instances == [] and single.balance == "least_request"


def test_a_grpc_fleet_names_weights_discovery_sources_and_unix_sockets() -> None:
    target = (
        manifest(
            {
                "id": "p",
                "version": "1.0.0",
                "target": {
                    "provider": "grpc",
                    "instances": [
                        {"address": "127.0.0.2:1", "weight": 3},
                        {"address": "unix:/run/plugins/a.sock"},
                        {"dns": {"name": "_p._tcp.plugins.internal"}},
                        {"registry": {"etcd": "http://127.0.0.1:2379", "prefix": "/p"}},
                    ],
                    "balance": "weighted",
                },
                "methods": {"whoami": {}},
            }
        )
        .plugins[0]
        .target
    )
    assert [(t.address, w) for t, w in target.weighted_instances()] == [
        ("127.0.0.2:1", 3),
        ("unix:/run/plugins/a.sock", 1),
    ]
    assert target.describe() == (
        "grpc fleet [127.0.0.2:1, unix:/run/plugins/a.sock, dns SRV _p._tcp.plugins.internal,"
        " etcd http://127.0.0.1:2379 /p]"
    )
    assert [d.field for d in target.destinations()] == [
        "instances[0].address",
        "instances[1].address",
        "instances[3].registry.etcd",
    ]
    from providers.discovery import Endpoint

    found = target.instance_at(Endpoint("127.0.0.9", 7000, weight=5))
    assert found.address == "127.0.0.9:7000"
    assert found.describe() == "grpc 127.0.0.9:7000"


@pytest.mark.parametrize(
    ("target", "where", "expected"),
    [
        ({}, "target", "needs an address or a list of instances"),
        ({"instances": []}, "target", "needs an address or a list of instances"),
        (
            {"address": "127.0.0.2:1", "instances": [{"address": "127.0.0.2:1"}]},
            "target",
            "instance 127.0.0.2:1 is listed twice",
        ),
        (
            {"instances": [{"address": "127.0.0.2:1"}, {"address": "http://127.0.0.3:1"}]},
            "instances[1]",
            "host:port",
        ),
        (
            {"instances": [{"address": "127.0.0.2:1"}, {"address": "169.254.169.254:80"}]},
            "instances[1].address",
            "link-local",
        ),
        ({"instances": [{"address": "127.0.0.2:1", "weight": 0}]}, "weight", ""),
        ({"instances": [{"address": "127.0.0.2:1"}], "balance": "random"}, "balance", ""),
        # grpc dials a port past 65535 modulo 65536: 99999 went to 34463
        ({"address": "127.0.0.1:99999"}, "address", "between 1 and 65535"),
        ({"instances": [{"address": "[::1]:70000"}]}, "instances[0].fixed.address", "65535"),
        ({"address": "127.0.0.1:0"}, "address", "between 1 and 65535"),
        ({"address": "127.0.0.1:\u0661"}, "address", "host:port"),  # an Arabic-Indic digit
        ({"address": "svc@127.0.0.1:1"}, "address", "host:port"),
        ({"address": "unix:/tmp/a\x00b"}, "address", "host:port"),  # was a bare ValueError
    ],
)
def test_bad_grpc_fleets_are_refused_where_they_are_written(
    target: dict[str, Any], where: str, expected: str
) -> None:
    with pytest.raises(ManifestError) as caught:
        manifest(
            {
                "id": "bad",
                "version": "1.0.0",
                "target": {"provider": "grpc", **target},
                "methods": {"whoami": {}},
            }
        )
    message = str(caught.value)
    assert where in message
    assert expected in message


# -- the connect marker, on the wire -----------------------------------------------------


async def call_once(target: GrpcTarget, method: str, params: Any, timeout: float) -> Any:
    provider = GrpcProvider()
    await provider.start()
    try:
        await provider.attach(_Plugin(), target)
        loop = asyncio.get_running_loop()
        invocation = Invocation("fleet", "1.0.0", method, params, loop.time() + timeout, "r-1")
        return await provider.invoke(target, invocation)
    finally:
        await provider.aclose()


class _Plugin:
    """The little of a plugin's manifest entry ``attach`` reads."""

    id = "fleet"
    version = "1.0.0"
    key = "fleet@1.0.0"
    config: dict[str, Any] = {}
    methods: dict[str, Any] = {}


def grpc_target(address: str) -> GrpcTarget:
    return GrpcTarget.model_validate({"provider": "grpc", "address": address, "events": False})


async def test_nothing_listening_is_marked_as_never_sent() -> None:
    with pytest.raises(TargetUnavailable) as caught:
        await call_once(grpc_target(dead_address(HOSTS[1])), "withdraw", {"amount": 1}, 5)
    assert caught.value.details == {"stage": "connect"}
    assert "failed to connect to all addresses" in caught.value.message


async def test_a_server_killed_with_the_call_in_flight_is_not_marked(
    instances: list[GrpcInstance],
) -> None:
    victim = instances[0]

    async def kill_soon() -> None:
        await asyncio.sleep(0.5)  # the call below sleeps 30 s in the plugin
        await asyncio.to_thread(victim.kill)

    killer = asyncio.create_task(kill_soon())
    with pytest.raises(TargetUnavailable) as caught:
        await call_once(grpc_target(victim.address), "sleep", {"seconds": 30}, 20)
    await killer
    assert caught.value.details.get("stage") != "connect", caught.value
    assert caught.value.retryable


# -- balancing and failover through the dispatcher --------------------------------------------


async def test_round_robin_spreads_calls_evenly(instances: list[GrpcInstance]) -> None:
    plugins = fleet_manifest([i.address for i in instances], balance="round_robin")
    async with Dispatcher(plugins) as dispatcher:
        results = await call_many(dispatcher, "whoami", {}, 300, workers=6)
        assert dispatcher.providers["grpc"]._connections.keys() == {  # type: ignore[attr-defined]
            t.key for t in plugins.plugins[0].target.instance_targets()
        }
    assert sorted(results) == sorted([*HOSTS] * 100)


async def test_a_dead_instance_is_failed_over_even_when_not_idempotent(
    instances: list[GrpcInstance],
) -> None:
    live = instances[0]
    for other in instances[1:]:
        other.kill()
    dead = [other.address for other in instances[1:]]  # refused: their processes are gone
    plugins = fleet_manifest([live.address, *dead])
    async with Dispatcher(plugins) as dispatcher:
        results = await call_many(dispatcher, "withdraw", {"amount": 1}, 100, workers=4)
        fleet = the_fleet(dispatcher)
    assert results == [{"instance": live.host, "left": 99}] * 100  # no failure at all
    assert fleet.failovers > 0
    assert fleet.outliers.total_ejections >= 1


async def test_when_every_instance_is_unreachable_the_call_fails_with_the_connect_error() -> None:
    plugins = fleet_manifest([dead_address(host) for host in HOSTS])
    async with Dispatcher(plugins) as dispatcher:
        with pytest.raises(TargetUnavailable) as caught:
            await dispatcher.call("fleet", "withdraw", {"amount": 1})
        assert the_fleet(dispatcher).failovers == 2  # each instance tried once
    assert caught.value.details == {"stage": "connect"}


async def test_lifecycle_dispatcher_runs_init_on_every_instance(
    instances: list[GrpcInstance],
) -> None:
    plugins = manifest(
        {
            "id": "fleet",
            "version": "1.0.0",
            "config": {"greeting": "each"},
            "target": {
                "provider": "grpc",
                "instances": [{"address": i.address} for i in instances],
                "balance": "round_robin",
                "lifecycle": "dispatcher",
            },
            "methods": METHODS,
        }
    )
    async with Dispatcher(plugins) as dispatcher:
        configs = [await dispatcher.call("fleet", "config", {}) for _ in HOSTS]
        hosts = {await dispatcher.call("fleet", "whoami", {}) for _ in HOSTS}
    assert configs == [{"greeting": "each"}] * 3
    assert hosts == set(HOSTS)


async def test_lifecycle_dispatcher_refuses_to_start_with_an_instance_down(
    instances: list[GrpcInstance],
) -> None:
    dead = dead_address(HOSTS[1])
    plugins = manifest(
        {
            "id": "fleet",
            "version": "1.0.0",
            "target": {
                "provider": "grpc",
                "instances": [{"address": instances[0].address}, {"address": dead}],
                "lifecycle": "dispatcher",
                "connect_timeout_ms": 1000,
            },
            "methods": METHODS,
        }
    )
    dispatcher = Dispatcher(plugins)
    with pytest.raises(TargetUnavailable) as caught:
        await dispatcher.start()
    assert dead in caught.value.message
    assert dispatcher.state == "closed"


# -- health -------------------------------------------------------------------------------------


async def test_health_reports_every_instance_with_its_state(instances: list[GrpcInstance]) -> None:
    dead = dead_address(HOSTS[2])
    instances[2].kill()
    plugins = fleet_manifest(
        [instances[0].address, instances[1].address, dead],
        outlier={"consecutive_failures": 1},
        balance="round_robin",  # least_request may leave one of three unpicked in 10 calls
    )
    async with Dispatcher(plugins) as dispatcher:
        for _ in range(10):
            await dispatcher.call("fleet", "withdraw", {"amount": 1})
        reports = await dispatcher.health()
    assert [(r.target, r.state, r.health.status) for r in reports] == [
        (f"grpc {instances[0].address}", "healthy", "serving"),
        (f"grpc {instances[1].address}", "healthy", "serving"),
        (f"grpc {dead}", "ejected", "not_serving"),
    ]
    assert {r.fleet for r in reports} == {plugins.plugins[0].target.describe()}


def test_dispatcher_health_shows_every_instance(
    instances: list[GrpcInstance], tmp_path: Path
) -> None:
    dead = dead_address(HOSTS[2])
    path = tmp_path / "plugins.yaml"
    target = {
        "provider": "grpc",
        "instances": [{"address": instances[0].address}, {"address": dead}],
    }
    plugin = {"id": "fleet", "version": "1.0.0", "target": target, "methods": {"whoami": {}}}
    path.write_text(yaml.safe_dump({"version": 1, "plugins": [plugin]}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [str(BIN / "dispatcher"), "-m", str(path), "health", "-o", "json"]
    ran = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert ran.returncode == 1, ran.stderr  # one instance is not serving
    reports = json.loads(ran.stdout)
    assert [(r["target"], r["status"]) for r in reports] == [
        (f"grpc {instances[0].address}", "serving"),
        (f"grpc {dead}", "not_serving"),
    ]
    assert {r["fleet"] for r in reports} == {f"grpc fleet [{instances[0].address}, {dead}]"}


# -- an instance killed mid-run ------------------------------------------------------------------

WORKERS = 8


async def test_an_instance_killed_mid_run_is_ejected_and_calls_go_on(
    instances: list[GrpcInstance],
) -> None:
    victim = instances[1]
    plugins = fleet_manifest(
        [i.address for i in instances],
        outlier={"consecutive_failures": 5, "base_ejection_ms": 60_000},
    )
    outcomes: dict[str, list[Any]] = {"whoami": [], "withdraw": []}
    running = True

    async with Dispatcher(plugins) as dispatcher:
        fleet = the_fleet(dispatcher)
        dead = fleet.instances[1]

        async def worker(number: int) -> None:
            method = "whoami" if number % 2 else "withdraw"
            params: dict[str, Any] = {} if method == "whoami" else {"amount": 1}
            while running:
                try:
                    outcomes[method].append(await dispatcher.call("fleet", method, params))
                except DispatchError as error:
                    outcomes[method].append(error)
                await asyncio.sleep(0.005)

        async def until(condition: Any, seconds: float) -> None:
            for _ in range(int(seconds / 0.02)):  # polls: the counters have no event to wait on
                if condition():
                    return
                await asyncio.sleep(0.02)

        workers = [asyncio.create_task(worker(number)) for number in range(WORKERS)]
        try:
            await until(lambda: dead.calls >= 50, 60)
            in_flight_at_kill = dead.in_flight
            await asyncio.to_thread(victim.kill)
            await until(lambda: fleet.state_of(dead) is not InstanceState.HEALTHY, 60)
            out_of_service = fleet.state_of(dead)
            failures_when_out = dead.failures
            calls_when_out = dead.calls
            total_when_out = sum(len(each) for each in outcomes.values())
            await until(
                lambda: sum(len(each) for each in outcomes.values()) >= total_when_out + 400, 60
            )
            calls_after = dead.calls
        finally:
            running = False
            await asyncio.gather(*workers)

    assert out_of_service is InstanceState.EJECTED
    # Ejected after consecutive_failures failed attempts, besides those already under way.
    assert failures_when_out <= 5 + in_flight_at_kill + WORKERS
    assert calls_after == calls_when_out  # nothing sent to it while ejected
    said = outcomes["whoami"]
    assert said and not [o for o in said if isinstance(o, DispatchError)]  # 100 %
    assert {o for o in said} <= set(HOSTS)
    withdrawn = outcomes["withdraw"]
    failed = [o for o in withdrawn if isinstance(o, DispatchError)]
    # A non-idempotent call fails only if it had reached the dead instance; one that could
    # not connect moved on, so none of the failures is a connect failure.
    assert all(o.details.get("stage") != "connect" for o in failed), failed
    assert len(failed) <= in_flight_at_kill + WORKERS
    assert len(withdrawn) - len(failed) > 100
    print(
        f"whoami {len(said)} calls, none failed; withdraw {len(withdrawn)} calls,"
        f" {len(failed)} failed; failovers {fleet.failovers}; dead instance"
        f" {failures_when_out} failures, {in_flight_at_kill} in flight at the kill"
    )
