"""Shared state on a real Redis (``state: {backend: redis}``), with real replicas.

Several dispatcher processes (``tests/state_replica.py``) share one redis-server
(``tests/services.py``) and call one plugin server (``tests/plugins/counting_plugin.py``
under ``dispatcher-plugin serve``), whose own counts say how often it really ran. The
"Redis is down" cases run one dispatcher in this process against a Redis the test kills
or freezes (SIGSTOP: it accepts connections and never answers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from dispatcher import Dispatcher, parse_manifest
from dispatcher.config import ManifestError, load_manifest
from dispatcher.state import StateUnavailable, digest, encode_result
from linchkit_plugin.errors import CircuitOpen, DeadlineExceeded, InvalidParams, RateLimited
from linchkit_plugin.wire import encode_json
from tests.services import CLEAN_ENVIRONMENT, Redis, free_port

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "plugins"
BIN = Path(sys.executable).parent
#: How long a replica may take to answer one command: a bound on a stuck test only.
PATIENCE = 120.0


# -- a plugin server and replicas -------------------------------------------------------


class PluginServer:
    """The counting plugin under ``dispatcher-plugin serve``, in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(BIN / "dispatcher-plugin"),
                "serve",
                "counting_plugin:CountingPlugin",
                "--path",
                str(PLUGINS),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=CLEAN_ENVIRONMENT,
        )
        deadline = time.monotonic() + 60
        import urllib.request

        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=0.5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        pytest.fail("the counting plugin server did not come up")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture
def counting_server() -> Iterator[PluginServer]:
    server = PluginServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Replica:
    """One dispatcher process; ``send`` a command, ``receive`` its reply."""

    def __init__(self, manifest: Path) -> None:
        self.stderr = manifest.parent / f"replica-{id(self)}.stderr"
        with self.stderr.open("wb") as stderr:  # a file: a pipe nobody reads would fill
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "state_replica.py"), str(manifest)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env={**CLEAN_ENVIRONMENT, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
        assert self.receive() == {"ready": True}

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        self.process.stdin.flush()

    def receive(self, timeout: float = PATIENCE) -> Any:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"the replica did not answer within {timeout:g} s")
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=30)
            raise AssertionError(
                f"the replica exited ({self.process.poll()}):\n{self.stderr.read_text()[-3000:]}"
            )
        return json.loads(line)

    def ask(self, **command: Any) -> Any:
        self.send(**command)
        return self.receive()

    def end(self) -> None:
        if self.process.poll() is None:
            try:
                self.send(op="quit")
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
        self.process.wait(timeout=30)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def replicas() -> Iterator[Any]:
    """Start replica processes; every one ends with the test, whatever happened."""
    started: list[Replica] = []

    def start(manifest: Path, count: int) -> list[Replica]:
        for _ in range(count):
            started.append(Replica(manifest))
        return started[-count:]

    yield start
    for replica in started:
        replica.end()


def write_manifest(
    folder: Path,
    url: str,
    prefix: str,
    target: dict[str, Any],
    methods: dict[str, Any],
    **state: Any,
) -> Path:
    path = folder / "plugins.yaml"
    document = {
        "version": 1,
        "state": {"backend": "redis", "url": url, "key_prefix": prefix, **state},
        "plugins": [{"id": "counter", "version": "1.0.0", "target": target, "methods": methods}],
    }
    path.write_text(json.dumps(document))  # JSON is YAML
    return path


# -- rate limits ------------------------------------------------------------------------------


@pytest.mark.slow
def test_three_replicas_share_one_rate_limit_exactly(
    tmp_path: Path,
    redis_server: Redis,
    redis_prefix: str,
    counting_server: PluginServer,
    replicas: Any,
) -> None:
    manifest = write_manifest(
        tmp_path,
        redis_server.url,
        redis_prefix,
        {"provider": "http", "url": counting_server.url},
        {"ping": {"rate_limit": {"rate": 100, "burst": 10, "mode": "reject"}}},
        on_unavailable="fail_closed",  # a fallback would admit more: make it an error instead
        op_timeout_ms=2000,
    )
    three = replicas(manifest, 3)
    for attempt in range(1, 4):
        reports = offer_together(three, rate=1000, seconds=10)
        admitted = sum(report.get("admitted", 0) for report in reports)
        limited = sum(report.get("limited", 0) for report in reports)
        unread = sum(report.get("state_unavailable", 0) for report in reports)
        # A call whose deadline passed while the machine starved it (a load of 12 on two
        # cores did so to 13 of 10,000) may have taken a token: it counts as unread does.
        late = sum(report.get("deadline_exceeded", 0) for report in reports)
        failed = {
            kind: count
            for report in reports
            for kind, count in report.items()
            if kind not in STARVED_OUTCOMES
        }
        print(
            f"attempt {attempt}: admitted {admitted}, limited {limited}, store past its bound"
            f" {unread}, per replica {reports}"
        )
        assert failed == {}, reports
        assert admitted + limited + unread + late == sum(report["offered"] for report in reports)
        # Never more than burst + rate x seconds = 10 + 100 x 10 (within 2 %), however
        # the replicas were scheduled: the limit is one limit.
        assert admitted <= 1010 * 1.02, reports
        if max(report["late_ms"] for report in reports) <= STARVED_MS and not unread + late:
            break
        # A replica the machine starved offered nothing for a while, then all at once:
        # the limit rightly refused what came late, so the total says nothing. Likewise a
        # limit that could not be read within op_timeout_ms (Redis or the replica starved,
        # at a load of 6 on two cores: 2,571 such calls on one replica once): fail_closed
        # refuses it, StateUnavailable, retryable, and skips Redis for retry_after_ms,
        # as it must; it admits none, which the bound above checks. Again.
        time.sleep(1.0)  # the limit's burst back
    else:
        pytest.skip(
            "the replicas were starved, or the store past its bound, in 3 runs: only the"
            " upper bound was checked"
        )
    assert all(report["admitted"] > 0 for report in reports), reports
    # Exactly: burst + rate x seconds = 10 + 100 x 10, within 2 %.
    assert abs(admitted - 1010) <= 1010 * 0.02, reports


#: What a replica's report may hold besides failures: its counts, and what a starved
#: machine brings (a limit not read in time, a deadline passed while waiting).
STARVED_OUTCOMES = (
    "admitted",
    "limited",
    "state_unavailable",
    "deadline_exceeded",
    "offered",
    "late_ms",
)
#: How far behind its schedule a replica may fall for a run to judge the limit exact: a
#: gap longer than the burst's worth (10 calls at 100/s) loses admissions for good.
STARVED_MS = 100


def offer_together(replicas: list[Any], rate: float, seconds: float) -> list[dict[str, Any]]:
    """``rate`` calls/s offered in total for ``seconds``, split over ``replicas``, from a
    wall-clock start they share; each replica's counts."""
    start_at = time.time() + 2.0
    for replica in replicas:
        replica.send(
            op="offer",
            plugin="counter",
            method="ping",
            rate=rate / len(replicas),
            seconds=seconds,
            start_at=start_at,
        )
    return [replica.receive() for replica in replicas]


# -- breakers -------------------------------------------------------------------------------


def test_a_circuit_one_replica_opens_is_open_for_the_others(
    tmp_path: Path,
    redis_server: Redis,
    redis_prefix: str,
    counting_server: PluginServer,
    replicas: Any,
) -> None:
    manifest = write_manifest(
        tmp_path,
        redis_server.url,
        redis_prefix,
        {"provider": "http", "url": counting_server.url},
        {
            "ping": {
                "timeout_ms": 2000,
                "breaker": {"fail_max": 3, "reset_timeout_ms": 1500, "half_open_max_calls": 1},
            }
        },
        # Long: only the pushed transition can tell B and C in time, not their views expiring.
        breaker_sync_ms=10_000,
    )
    a, b, c = replicas(manifest, 3)
    for replica in (a, b, c):  # every replica has a fresh view of a closed, healthy breaker
        assert replica.ask(op="call", plugin="counter", method="ping")["ok"]
    counting_server.stop()
    for _ in range(3):
        outcome = a.ask(op="call", plugin="counter", method="ping")
        assert outcome["type"] == "target_unavailable", outcome
    for replica in (b, c):
        # The push is asynchronous: a command sent now may reach the replica before it.
        # Its arrival is what this waits for (breaker_sync_ms is 10 s: nothing else could
        # end the replica's trust in its closed view within the 5 s allowed).
        deadline = time.monotonic() + 5.0
        while set(replica.ask(op="shared_breakers").values()) == {"closed"}:
            assert time.monotonic() < deadline, "the open circuit was not pushed to a replica"
            time.sleep(0.01)
        outcome = replica.ask(op="call", plugin="counter", method="ping")
        assert outcome["type"] == "circuit_open", outcome
        assert "all replicas" in outcome["message"]
    time.sleep(1.6)  # reset_timeout: the next calls may probe, at most one of all of them
    b.send(op="calls", n=5, plugin="counter", method="ping")
    c.send(op="calls", n=5, plugin="counter", method="ping")
    outcomes = b.receive() + c.receive()
    kinds = sorted(outcome.get("type", "ok") for outcome in outcomes)
    assert kinds.count("target_unavailable") == 1, kinds  # the one probe, which failed
    assert kinds.count("circuit_open") == 9, kinds
    # The probe failed: open again for everyone, A included.
    assert a.ask(op="call", plugin="counter", method="ping")["type"] == "circuit_open"


# -- idempotency ------------------------------------------------------------------------------


def test_one_idempotency_key_runs_once_across_three_replicas(
    tmp_path: Path,
    redis_server: Redis,
    redis_prefix: str,
    counting_server: PluginServer,
    replicas: Any,
) -> None:
    manifest = write_manifest(
        tmp_path,
        redis_server.url,
        redis_prefix,
        {"provider": "http", "url": counting_server.url},
        {"charge": {"timeout_ms": 20_000}, "counts": {}},
    )
    three = replicas(manifest, 3)
    for replica, n in zip(three, (34, 33, 33), strict=True):
        replica.send(
            op="calls", n=n, plugin="counter", method="charge",
            params={"amount": 5, "delay": 0.3}, key="order-17", timeout=20.0,
        )  # fmt: skip
    outcomes = [outcome for replica in three for outcome in replica.receive()]
    assert len(outcomes) == 100
    assert all(outcome["ok"] for outcome in outcomes), [o for o in outcomes if not o["ok"]][:3]
    assert {json.dumps(outcome["result"]) for outcome in outcomes} == {
        json.dumps({"charged": 5, "run": 1})
    }
    counts = three[0].ask(op="call", plugin="counter", method="counts")["result"]
    assert counts["charges"] == 1  # counted by the plugin itself

    # Later duplicates get the stored result; the same key with other params is refused.
    again = three[1].ask(
        op="call",
        plugin="counter",
        method="charge",
        params={"amount": 5, "delay": 0.3},
        key="order-17",
    )
    assert again["ok"] and again["result"] == {"charged": 5, "run": 1}
    other = three[2].ask(
        op="call",
        plugin="counter",
        method="charge",
        params={"amount": 6, "delay": 0.3},
        key="order-17",
    )
    assert other["type"] == "invalid_params"
    assert "already used" in other["message"] and "order-17" in other["message"]
    # Another caller's same key is another record: it runs, and never sees the first result.
    theirs = three[2].ask(
        op="call", plugin="counter", method="charge", params={"amount": 5, "delay": 0},
        key="order-17", caller="mallory",
    )  # fmt: skip
    assert theirs["ok"] and theirs["result"]["run"] == 2
    assert three[0].ask(op="call", plugin="counter", method="counts")["result"]["charges"] == 2


# -- cache ------------------------------------------------------------------------------------


def test_cached_results_and_their_invalidation_are_shared(
    tmp_path: Path,
    redis_server: Redis,
    redis_prefix: str,
    counting_server: PluginServer,
    replicas: Any,
) -> None:
    manifest = write_manifest(
        tmp_path,
        redis_server.url,
        redis_prefix,
        {"provider": "http", "url": counting_server.url},
        {"read": {"pure": True, "cache": {"ttl_ms": 60_000, "per_caller": True}}},
    )
    a, b = replicas(manifest, 2)

    def read(replica: Replica, caller: str) -> int:
        outcome = replica.ask(
            op="call", plugin="counter", method="read", params={"item": "x"}, caller=caller
        )
        assert outcome["ok"], outcome
        return int(outcome["result"]["read"])

    assert read(a, "alice") == 1
    assert read(b, "alice") == 1  # A's result, from Redis
    assert read(b, "bob") == 2  # per caller: bob does not get alice's entry
    assert a.ask(op="invalidate", plugin="counter")["ok"]
    assert read(b, "alice") == 3  # B sees A's invalidation on its very next read
    assert read(a, "alice") == 3
    assert read(a, "bob") == 4


# -- Redis slow or down, in this process ----------------------------------------------------------


def local_manifest(folder: Path, url: str, prefix: str, mode: str) -> Any:
    path = write_manifest(
        folder,
        url,
        prefix,
        {"provider": "local", "entrypoint": "counting_plugin:CountingPlugin", "path": str(PLUGINS)},
        {
            "read": {
                "pure": True,
                "cache": {"ttl_ms": 60_000},
                "rate_limit": {"rate": 1000, "burst": 100, "mode": "wait"},
                "breaker": {"fail_max": 3, "reset_timeout_ms": 1000},
            }
        },
        on_unavailable=mode,
        op_timeout_ms=100,
        retry_after_ms=300,
    )
    return load_manifest(path)


async def calls_during(dispatcher: Dispatcher, count: int, timeout: float) -> list[Any]:
    """``count`` calls one after another, each checked to end within its deadline."""
    outcomes: list[Any] = []
    for i in range(count):
        started = time.monotonic()
        try:
            outcomes.append(
                await dispatcher.call(
                    "counter", "read", {"item": str(i)}, timeout=timeout, idempotency_key=f"k{i}"
                )
            )
        except Exception as error:  # what each mode promises is checked by the caller
            outcomes.append(error)
        # The call's deadline, plus scheduling slack for a busy 2-core machine.
        assert time.monotonic() - started < timeout + 0.25
    return outcomes


@pytest.mark.parametrize("how", ["killed", "frozen"])
async def test_fail_open_falls_back_to_local_state_within_the_deadline(
    tmp_path: Path, own_redis: Redis, redis_prefix: str, how: str
) -> None:
    manifest = local_manifest(tmp_path, own_redis.url, redis_prefix, "fail_open")
    async with Dispatcher(manifest) as dispatcher:
        assert all(isinstance(o, dict) for o in await calls_during(dispatcher, 5, 1.0))
        own_redis.stop() if how == "killed" else own_redis.pause()
        try:
            outcomes = await calls_during(dispatcher, 20, 0.5)
            assert all(isinstance(o, dict) for o in outcomes), outcomes
            stats = dispatcher.stats()["state"]
            assert stats["fallbacks"] > 0 and stats["failures"] > 0
            assert stats["available"] is False or stats["skipped"] > 0
        finally:
            own_redis.resume() if how == "frozen" else own_redis.start()
        await asyncio.sleep(0.4)  # retry_after: Redis is tried again
        before = dispatcher.stats()["state"]
        await calls_during(dispatcher, 5, 2.0)
        after = dispatcher.stats()["state"]
        assert after["fallbacks"] == before["fallbacks"], f"{before} {after}"


async def test_fail_open_says_when_redis_is_back_and_counts_its_fallbacks_in_metrics(
    tmp_path: Path, own_redis: Redis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    local_manifest(tmp_path, own_redis.url, redis_prefix, "fail_open")
    path = tmp_path / "plugins.yaml"
    path.write_text(
        json.dumps({**json.loads(path.read_text()), "telemetry": {"metrics": {"enabled": True}}})
    )
    manifest = load_manifest(path)
    caplog.set_level(logging.INFO, "dispatcher.state")
    async with Dispatcher(manifest) as dispatcher:
        registry = dispatcher.telemetry.metrics.registry  # type: ignore[union-attr]
        assert registry.get_sample_value("dispatcher_state_fallbacks_total") == 0
        await calls_during(dispatcher, 3, 1.0)
        own_redis.stop()
        try:
            await calls_during(dispatcher, 10, 0.5)
        finally:
            own_redis.start()
        fallbacks = dispatcher.stats()["state"]["fallbacks"]
        assert fallbacks > 0
        assert registry.get_sample_value("dispatcher_state_fallbacks_total") == fallbacks
        await asyncio.sleep(0.4)  # retry_after: Redis is tried again
        await calls_during(dispatcher, 5, 2.0)
    lines = [record.getMessage() for record in caplog.records]
    assert any("using this replica's own state" in line for line in lines), lines
    back = [line for line in lines if "answers again" in line]
    assert len(back) == 1, lines
    assert back[0].startswith(f"state store {own_redis.url} answers again after ")
    assert back[0].endswith(f"; {fallbacks} fallbacks to this replica's own state meanwhile")


@pytest.mark.parametrize("how", ["killed", "frozen"])
async def test_fail_closed_fails_typed_within_the_deadline(
    tmp_path: Path, own_redis: Redis, redis_prefix: str, how: str
) -> None:
    manifest = local_manifest(tmp_path, own_redis.url, redis_prefix, "fail_closed")
    async with Dispatcher(manifest) as dispatcher:
        assert all(isinstance(o, dict) for o in await calls_during(dispatcher, 3, 1.0))
        own_redis.stop() if how == "killed" else own_redis.pause()
        try:
            outcomes = await calls_during(dispatcher, 10, 0.5)
            assert all(isinstance(o, StateUnavailable) for o in outcomes), outcomes
            assert all(o.type == "target_unavailable" and o.retryable for o in outcomes)
            assert "state store redis://127.0.0.1" in outcomes[0].message
            # A deadline shorter than the operation timeout ends the call at the deadline.
            started = time.monotonic()
            with pytest.raises((StateUnavailable, DeadlineExceeded)):
                await dispatcher.call("counter", "read", {"item": "late"}, timeout=0.05)
            assert time.monotonic() - started < 0.3
        finally:
            own_redis.resume() if how == "frozen" else own_redis.start()
        await asyncio.sleep(0.4)
        assert all(isinstance(o, dict) for o in await calls_during(dispatcher, 3, 2.0))


async def test_a_password_in_the_url_never_shows(
    tmp_path: Path, own_redis: Redis, redis_prefix: str
) -> None:
    url = own_redis.url.replace("redis://", "redis://user:s3cret-pw@")
    manifest = local_manifest(tmp_path, url, redis_prefix, "fail_closed")
    async with Dispatcher(manifest) as dispatcher:
        own_redis.stop()
        with pytest.raises(StateUnavailable) as caught:
            await dispatcher.call("counter", "read", {"item": "x"}, timeout=1.0)
        assert "s3cret-pw" not in str(caught.value)
        assert "s3cret-pw" not in repr(dispatcher.stats())
        own_redis.start()


# -- idempotency in one process (the memory backend) ----------------------------------------------


async def test_memory_backend_runs_a_key_once_in_this_process(tmp_path: Path) -> None:
    path = tmp_path / "plugins.yaml"
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "plugins": [
                    {
                        "id": "counter",
                        "version": "1.0.0",
                        "target": {
                            "provider": "local",
                            "entrypoint": "counting_plugin:CountingPlugin",
                            "path": str(PLUGINS),
                        },
                        "methods": {"charge": {}, "counts": {}},
                    }
                ],
            }
        )
    )
    async with Dispatcher.from_file(path) as dispatcher:
        params = {"amount": 3, "delay": 0.05}
        results = await asyncio.gather(
            *(dispatcher.call("counter", "charge", params, idempotency_key="a") for _ in range(20))
        )
        assert all(result == {"charged": 3, "run": 1} for result in results)
        with pytest.raises(InvalidParams, match="already used"):
            await dispatcher.call("counter", "charge", {"amount": 4}, idempotency_key="a")
        with pytest.raises(InvalidParams, match="idempotency_key"):
            await dispatcher.call("counter", "charge", params, idempotency_key="x" * 256)
        await dispatcher.call("counter", "charge", params)  # no key: runs every time
        assert (await dispatcher.call("counter", "counts"))["charges"] == 2


async def test_a_refused_first_call_gives_its_key_back(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    path = write_manifest(
        tmp_path,
        redis_server.url,
        redis_prefix,
        {"provider": "local", "entrypoint": "counting_plugin:CountingPlugin", "path": str(PLUGINS)},
        {"charge": {"rate_limit": {"rate": 1, "burst": 1, "mode": "reject"}}, "counts": {}},
    )
    async with Dispatcher.from_file(path) as dispatcher:
        await dispatcher.call("counter", "charge", {"amount": 1, "delay": 0})
        with pytest.raises(RateLimited):  # never ran: the key stays free
            await dispatcher.call(
                "counter", "charge", {"amount": 2, "delay": 0}, idempotency_key="k"
            )
        await asyncio.sleep(1.1)
        result = await dispatcher.call(
            "counter", "charge", {"amount": 2, "delay": 0}, idempotency_key="k"
        )
        assert result == {"charged": 2, "run": 2}


#: The claim a dispatcher before 2026-12-05 runs (``state._scripts.IDEMPOTENCY_CLAIM`` then):
#: it compares the params' fingerprint alone, and writes records without a version.
OLDER_CLAIM = """
local fp = redis.call('HGET', KEYS[1], 'fp')
if not fp then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'token', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'run'}
end
if fp ~= ARGV[1] then return {'mismatch'} end
if redis.call('HEXISTS', KEYS[1], 'outcome') == 0 then return {'busy'} end
return {'done', redis.call('HGET', KEYS[1], 'outcome')}
"""


def charge_manifest(folder: Path, url: str, prefix: str) -> Path:
    target = {"provider": "local", "entrypoint": "counting_plugin:CountingPlugin"}
    methods = {"charge": {}, "counts": {}}
    return write_manifest(folder, url, prefix, {**target, "path": str(PLUGINS)}, methods)


def charge_record(prefix: str, raw_key: str) -> str:
    """The Redis key of an anonymous caller's idempotency record of ``counter.charge``."""
    return f"{prefix}:idem:" + digest("counter", "charge", "\0", raw_key)


#: A record's fingerprint, then and now: the params' canonical JSON.
CHARGE = {"amount": 5, "delay": 0}
CHARGE_FINGERPRINT = digest(encode_json(CHARGE, sort_keys=True))


async def test_a_record_an_older_dispatcher_wrote_replays_for_the_same_params(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Before: the version went into a record's fingerprint, so a record an older
    dispatcher wrote (the params' fingerprint alone, no version) met a retry of its call
    with ``InvalidParams`` for the record's whole retention (24 h), and on a rolling
    deploy. It replays; other params are refused as ever."""
    path = charge_manifest(tmp_path, redis_server.url, redis_prefix)
    async with (
        aioredis.Redis.from_url(redis_server.url) as client,
        Dispatcher.from_file(path) as dispatcher,
    ):
        record = charge_record(redis_prefix, "order-1")
        older = {"fp": CHARGE_FINGERPRINT, "token": "t", "outcome": encode_result({"charged": 5})}
        await client.hset(record, mapping=older)
        await client.pexpire(record, 60_000)
        replayed = await dispatcher.call("counter", "charge", CHARGE, idempotency_key="order-1")
        assert replayed == {"charged": 5}
        with pytest.raises(InvalidParams, match="already used"):
            await dispatcher.call("counter", "charge", {"amount": 6}, idempotency_key="order-1")
        assert (await dispatcher.call("counter", "counts"))["charges"] == 0


async def test_a_record_written_now_replays_on_an_older_replica(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Before: during a rolling deploy a retry reaching a replica not yet replaced was
    refused with ``InvalidParams`` (its fingerprint, the params' alone, did not match the
    new one with the version in it). The version is a field beside the fingerprint."""
    path = charge_manifest(tmp_path, redis_server.url, redis_prefix)
    async with (
        aioredis.Redis.from_url(redis_server.url) as client,
        Dispatcher.from_file(path) as dispatcher,
    ):
        first = await dispatcher.call("counter", "charge", CHARGE, idempotency_key="order-2")
        assert first == {"charged": 5, "run": 1}
        record = charge_record(redis_prefix, "order-2")
        answer = await client.eval(OLDER_CLAIM, 1, record, CHARGE_FINGERPRINT, "t", 60_000)
        assert answer == [b"done", encode_result(first)]
        assert await client.hget(record, "version") == b"1.0.0"


async def test_open_shared_breaker_refuses_without_a_target_call(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    path = write_manifest(
        tmp_path, redis_server.url, redis_prefix, {"provider": "http", "url": dead},
        {"ping": {"breaker": {"fail_max": 2, "reset_timeout_ms": 60_000}}},
    )  # fmt: skip
    async with Dispatcher.from_file(path) as first, Dispatcher.from_file(path) as second:
        for _ in range(2):
            with pytest.raises(Exception, match=r"127\.0\.0\.1"):
                await first.call("counter", "ping")
        with pytest.raises(CircuitOpen) as caught:
            await second.call("counter", "ping")
        assert caught.value.retry_after is not None and 50 < caught.value.retry_after <= 60


# -- the manifest's state section ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        ({"backend": "redis"}, "needs a 'url'"),
        ({"backend": "memory", "url": "redis://127.0.0.1:1/0"}, "is for backend 'redis'"),
        ({"backend": "etcd"}, "state.backend"),
        ({"backend": "redis", "url": "redis://x", "op_timeout_ms": 0}, "op_timeout_ms"),
        ({"backend": "redis", "url": "redis://x", "key_prefix": "a b"}, "key_prefix"),
        ({"backend": "redis", "url": "redis://x", "on_unavailable": "maybe"}, "on_unavailable"),
    ],
)
def test_a_wrong_state_section_is_refused_where_it_is(
    tmp_path: Path, state: dict[str, Any], problem: str
) -> None:
    path = tmp_path / "plugins.yaml"
    path.write_text(json.dumps({"version": 1, "state": state, "plugins": []}))
    with pytest.raises(ManifestError, match=problem):
        load_manifest(path)


# -- the Redis URL's query -------------------------------------------------------------------------

#: redis-py hands every query argument to its connection class: these loaded, and the first
#: connection failed deep in a call (a TypeError for an unknown key, a ValueError for a value
#: its parser refuses), or quietly connected otherwise than the URL seemed to say.
BROKEN_QUERIES = [
    ("redis://:s3cret@127.0.0.1:6379/0?foo=bar", "holds 'foo', which the dispatcher does not"),
    ("redis://:s3cret@127.0.0.1:6379/0?db=abc", "'db' in the Redis URL's query must be"),
    ("redis://:s3cret@127.0.0.1:6379/0?db=-1", "'db' in the Redis URL's query must be"),
    ("redis://:s3cret@127.0.0.1:6379/0?db=1&db=2", "gives 'db' twice"),
    ("redis://:s3cret@127.0.0.1:6379/0?db=", "'db' in the Redis URL's query has no value"),
    ("redis://:s3cret@127.0.0.1:6379/0?db", "'db' in the Redis URL's query has no value"),
    ("redis://:s3cret@127.0.0.1:6379/0?socket_keepalive=flase", "must be yes or no"),
    ("redis://:s3cret@127.0.0.1:6379/0?client_name=a%20b", "'client_name' in the Redis URL"),
    ("unix://:s3cret@/tmp/redis.sock?socket_keepalive=yes", "for redis:// and rediss://"),
    ("redis://:s3cret@127.0.0.1:6379/0?ssl_ca_certs=/ca.pem", "for rediss:// URLs only"),
    ("rediss://:s3cret@127.0.0.1:6379/0?ssl_ca_certs=a%00b", "must be a file's path"),
    ("redis://:s3cret@127.0.0.1:6379/0?s3cret%0a=1", "holds an argument, which"),
]

#: redis-py understands these, and a query argument wins over what the dispatcher passes:
#: each would undo a field of the state section, the dispatcher's own retry and reply
#: handling, or the checks of the server's certificate, or print a secret with the URL.
REFUSED_QUERIES = [
    ("redis://:s3cret@h:6379/0?socket_timeout=30", "'op_timeout_ms' sets it"),
    ("redis://:s3cret@h:6379/0?socket_connect_timeout=30", "'op_timeout_ms' sets it"),
    ("redis://:s3cret@h:6379/0?timeout=30", "'op_timeout_ms' sets it"),
    ("redis://:s3cret@h:6379/0?max_connections=1000", "'pool_size' sets it"),
    ("redis://:s3cret@h:6379/0?retry_on_timeout=yes", "how a Redis operation is retried"),
    ("redis://:s3cret@h:6379/0?health_check_interval=5", "when a pooled connection"),
    ("redis://:s3cret@h:6379/0?protocol=3", "RESP2"),
    ("redis://:s3cret@h:6379/0?legacy_responses=no", "usual replies"),
    ("rediss://:s3cret@h:6379/0?ssl_cert_reqs=none", "weaken how the server's certificate"),
    ("rediss://:s3cret@h:6379/0?ssl_check_hostname=no", "weaken how the server's certificate"),
    ("rediss://:s3cret@h:6379/0?ssl_min_version=769", "weaken how the server's certificate"),
    ("rediss://:s3cret@h:6379/0?ssl_exclude_verify_flags=VERIFY_X509_STRICT", "weaken"),
    ("rediss://:s3cret@h:6379/0?ssl_include_verify_flags=VERIFY_X509_PARTIAL_CHAIN", "weaken"),
    ("rediss://:s3cret@h:6379/0?ssl_ciphers=NULL", "weaken how the server's certificate"),
    ("redis://h:6379/0?password=s3cret", "before the host"),
    ("unix:///tmp/redis.sock?username=u&password=s3cret", "before the host"),
    ("rediss://h:6379/0?ssl_password=s3cret", "before the host"),
]


def write_state_url(folder: Path, url: str) -> Path:
    path = folder / "plugins.yaml"
    # The URL on line 4, as an operator writes it.
    path.write_text(f"version: 1\nstate:\n  backend: redis\n  url: {json.dumps(url)}\n")
    return path


@pytest.mark.parametrize(("url", "problem"), BROKEN_QUERIES + REFUSED_QUERIES)
def test_a_redis_url_query_is_refused_at_load_naming_the_line_and_field(
    tmp_path: Path, url: str, problem: str
) -> None:
    with pytest.raises(ManifestError) as caught:
        load_manifest(write_state_url(tmp_path, url))
    (refused,) = caught.value.problems
    assert (refused.path, refused.line) == ("state.url", 4)
    assert problem in refused.message
    assert "s3cret" not in str(caught.value)


#: Every argument the query takes, on each scheme that takes it.
TAKEN_QUERIES = [
    "redis://:pw@127.0.0.1:6379/0?db=3&client_name=linchkit-a&socket_keepalive=no",
    "redis://127.0.0.1:6379?db=2",
    "rediss://:pw@redis.example:6380/1?socket_keepalive=YES&ssl_ca_certs=/etc/ca.pem"
    "&ssl_ca_path=/etc/ssl/certs&ssl_certfile=/run/client.pem&ssl_keyfile=/run/client.key",
    "unix://:pw@/run/redis/redis.sock?db=4&client_name=linchkit",
]


@pytest.mark.parametrize("url", TAKEN_QUERIES)
async def test_the_query_arguments_taken_are_ones_redis_py_connects_with(url: str) -> None:
    """Held to the installed redis-py: a connection made from the URL takes every argument
    (an argument its class does not take is the TypeError of the first connection)."""
    parse_manifest({"version": 1, "state": {"backend": "redis", "url": url}})
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=1)
    connection = pool.make_connection()
    await connection.disconnect()


async def test_the_query_reaches_a_real_redis(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/0?db=5&client_name={redis_prefix}"
    url += "&socket_keepalive=yes"
    async with Dispatcher(local_manifest(tmp_path, url, redis_prefix, "fail_closed")) as dispatcher:
        await dispatcher.call("counter", "read", {"item": "x"}, timeout=5.0)
        named = await settled_connections(redis_server, redis_prefix)
    assert named and all(" db=5 " in line for line in named), named


#: The commands redis-py sends while it makes a connection, before its SELECT: a
#: connection whose last command is one of them has not reached its database yet. NULL:
#: accepted, and no command yet (a loaded machine caught one there, on db 0).
HANDSHAKE_COMMANDS = {"NULL", "hello", "auth", "client|setname", "client|setinfo"}


async def settled_connections(redis_server: Redis, name: str) -> list[str]:
    """The CLIENT LIST lines of connections named `name`, once none is mid-handshake
    (a background connection caught between its CLIENT SETNAME and its SELECT is still
    on db 0)."""
    for _ in range(50):
        clients = redis_server.command("CLIENT", "LIST").decode()
        named = [line for line in clients.splitlines() if f"name={name} " in line]
        if not any(last_command(line) in HANDSHAKE_COMMANDS for line in named):
            return named
        await asyncio.sleep(0.02)
    raise AssertionError(f"a connection stayed mid-handshake for a second:\n{clients}")


def last_command(client_line: str) -> str:
    fields = dict(field.split("=", 1) for field in client_line.split() if "=" in field)
    return fields.get("cmd", "")
