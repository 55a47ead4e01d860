"""Safe rollout and shadow traffic (``rollouts:`` in the manifest, ``dispatcher._rollout``):
a failing canary is rolled back within one interval with at most one failed call past
its budget, a healthy one walks every step, a shadow never changes a caller's answer, a
rollout never serves one version's cached result to the other, and a keyed call or
submission it routes runs once, its repeats sent one way and replayed wherever they land."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from dispatcher import Dispatcher, ManifestError, RolloutEvent, parse_manifest
from linchkit_plugin.errors import DispatchError, InvalidParams
from tests.conftest import ROOT
from tests.services import Redis

PLUGINS = str(ROOT / "tests" / "plugins")
SOURCE_PATH = os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python"), PLUGINS])


def version(number: str, target: dict[str, Any] | None = None, **config: Any) -> dict[str, Any]:
    return {
        "id": "svc",
        "version": number,
        "config": {"version": number, **config},
        "target": target
        or {"provider": "local", "entrypoint": "rollout_plugin:RolloutPlugin", "path": PLUGINS},
        "methods": {
            "answer": {},
            "calls_seen": {},
            "pure_answer": {"pure": True},
        },
    }


def rollouts_manifest(
    *plugins: dict[str, Any], rollouts: list[dict[str, Any]], **sections: Any
) -> Any:
    return parse_manifest(
        {"version": 1, "plugins": list(plugins), "rollouts": rollouts, **sections}, base_dir=ROOT
    )


def rollout(**overrides: Any) -> dict[str, Any]:
    return {"plugin": "svc", "method": "answer", "from": "1.0.0", "to": "2.0.0", **overrides}


async def test_a_failing_canary_is_rolled_back_within_one_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = rollout(steps=[50, 100], interval_s=30, max_error_rate=0.1, min_calls=10)
    manifest = rollouts_manifest(version("1.0.0"), version("2.0.0", fail_from=5), rollouts=[spec])
    events: list[RolloutEvent] = []
    async with Dispatcher(manifest) as dispatcher:
        dispatcher.on_rollout(events.append)
        started = time.monotonic()
        failed = answered = 0
        with caplog.at_level(logging.WARNING, "dispatcher.rollout"):
            while dispatcher.stats()["rollouts"]["svc.answer"]["status"] == "running":
                assert time.monotonic() - started < 30, "not rolled back within the interval"
                try:
                    await dispatcher.call("svc", "answer", {"x": 1})
                    answered += 1
                except DispatchError:
                    failed += 1
        stats = dispatcher.stats()["rollouts"]["svc.answer"]
        # Budget: 10 % of max(calls, 10) failures; the call that crosses it is the last.
        budget = int(0.1 * max(stats["window"]["calls"], 10))
        assert 1 <= failed <= budget + 1
        assert stats["status"] == "rolled_back"
        assert stats["percent"] == 0
        assert stats["rollbacks"] == 1
        assert stats["errors"]["to"] == failed
        assert [event.kind for event in events] == ["rolled_back"]
        assert events[0].percent == 0 and "over the budget" in events[0].reason
        assert any(record.levelno == logging.WARNING for record in caplog.records)
        # From now on every call goes to 1.0.0 again.
        results = [await dispatcher.call("svc", "answer") for _ in range(20)]
        assert {result["version"] for result in results} == {"1.0.0"}


async def test_a_healthy_canary_walks_every_step_to_100() -> None:
    spec = rollout(steps=[10, 50, 100], interval_s=0.2, min_calls=3)
    manifest = rollouts_manifest(version("1.0.0"), version("2.0.0"), rollouts=[spec])
    events: list[RolloutEvent] = []
    async with Dispatcher(manifest) as dispatcher:
        dispatcher.on_rollout(events.append)
        # The first step: exactly 10 of every 100 calls naming no exact version move.
        first = [(await dispatcher.call("svc", "answer"))["version"] for _ in range(100)]
        assert first.count("2.0.0") == 10
        # A range both versions satisfy splits too; an exact version goes where it says.
        assert (await dispatcher.call("svc", "answer", version="1.0.0"))["version"] == "1.0.0"
        ranged = [
            (await dispatcher.call("svc", "answer", version="*"))["version"] for _ in range(10)
        ]
        assert ranged.count("2.0.0") == 1
        deadline = time.monotonic() + 20
        while dispatcher.stats()["rollouts"]["svc.answer"]["status"] != "completed":
            assert time.monotonic() < deadline, dispatcher.stats()["rollouts"]
            await dispatcher.call("svc", "answer")
            await asyncio.sleep(0.002)
        assert [(event.kind, event.percent) for event in events] == [
            ("advanced", 50),
            ("completed", 100),
        ]
        last = [(await dispatcher.call("svc", "answer"))["version"] for _ in range(10)]
        assert set(last) == {"2.0.0"}
        assert dispatcher.stats()["rollouts"]["svc.answer"]["errors"] == {"from": 0, "to": 0}


async def test_pause_resume_and_abort() -> None:
    spec = rollout(steps=[50, 100], interval_s=0.05, min_calls=1)
    manifest = rollouts_manifest(version("1.0.0"), version("2.0.0"), rollouts=[spec])
    async with Dispatcher(manifest) as dispatcher:
        assert dispatcher.control_rollout("svc", "answer", "pause")["status"] == "paused"
        for _ in range(10):
            await dispatcher.call("svc", "answer")
        await asyncio.sleep(0.1)
        await dispatcher.call("svc", "answer")
        assert dispatcher.stats()["rollouts"]["svc.answer"]["percent"] == 50  # held
        assert dispatcher.control_rollout("svc", "answer", "abort")["percent"] == 0
        results = [await dispatcher.call("svc", "answer") for _ in range(10)]
        assert {result["version"] for result in results} == {"1.0.0"}
        assert dispatcher.control_rollout("svc", "answer", "resume")["percent"] == 50
        with pytest.raises(DispatchError, match="no rollout"):
            dispatcher.control_rollout("svc", "calls_seen", "pause")


async def test_shadow_never_changes_the_callers_answer_and_counts_differences() -> None:
    spec = {
        "plugin": "svc",
        "method": "pure_answer",
        "from": "1.0.0",
        "shadow": {"version": "2.0.0", "percent": 100, "max_in_flight": 64},
    }
    manifest = rollouts_manifest(
        version("1.0.0"), version("2.0.0", tag="other", fail_every=5), rollouts=[spec]
    )
    async with Dispatcher(manifest) as dispatcher:
        # 2.0.0 is the highest version, yet the shadowed method's calls stay on 1.0.0.
        results = [await dispatcher.call("svc", "pure_answer", {"x": x}) for x in range(40)]
        assert results == [{"x": x, "tag": "1.0.0" if x % 2 else "same"} for x in range(40)]
        deadline = time.monotonic() + 10
        while True:
            stats = dispatcher.stats()["rollouts"]["svc.pure_answer"]
            if stats["equal"] + stats["different"] + stats["failed"] == stats["mirrored"] == 40:
                break
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.01)
        assert stats["failed"] == 8  # every 5th of 40 calls
        assert stats["different"] > 0 and stats["equal"] > 0
        assert stats["different"] + stats["equal"] == 32
        assert 0 < len(stats["recent_differences"]) <= 5
        kinds = {each["kind"] for each in stats["recent_differences"]}
        assert kinds <= {"result_differs", "shadow_failed"} and kinds


async def test_a_rollout_never_serves_one_versions_cached_result_to_the_other() -> None:
    cached = {"pure": True, "cache": {"ttl_ms": 60_000}}
    plugins = [version("1.0.0"), version("2.0.0")]
    for plugin in plugins:
        plugin["methods"]["answer"] = cached
    spec = rollout(steps=[50, 100], interval_s=60)
    async with Dispatcher(rollouts_manifest(*plugins, rollouts=[spec])) as dispatcher:
        results = [await dispatcher.call("svc", "answer", {"x": 7}) for _ in range(20)]
        assert [result["version"] for result in results].count("2.0.0") == 10
        # Each version's target ran once; every other call was its own version's cache.
        assert await dispatcher.call("svc", "calls_seen", version="1.0.0") == 1
        assert await dispatcher.call("svc", "calls_seen", version="2.0.0") == 1


def redis_state(redis_server: Redis, redis_prefix: str) -> dict[str, Any]:
    return {"backend": "redis", "url": redis_server.url, "key_prefix": redis_prefix}


@pytest.fixture(params=["memory", "redis"])
def state(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The manifest's ``state`` section: this process's memory, or a real Redis."""
    if request.param == "memory":
        return {"backend": "memory"}
    return redis_state(
        request.getfixturevalue("redis_server"), request.getfixturevalue("redis_prefix")
    )


#: Keys of which the rollout below sends some to each version (a stable hash of the key).
KEYS = [f"order-{number}" for number in range(12)]


async def test_a_keyed_call_runs_once_during_a_rollout_wherever_its_repeats_land(
    state: dict[str, Any],
) -> None:
    """Before: a rollout's routes took keyed calls past the idempotency step
    (``Route.with_invoke`` made their keyed chain the rollout's measuring alone), so at
    50 % one key sent 4 times ran 4 times, on both versions. A key's calls go to one
    side and run once; a repeat after the split moved (here: aborted to 0 %) replays the
    first answer, neither running on 1.0.0 nor refused for the version it landed on."""
    spec = rollout(steps=[50, 100], interval_s=60)
    manifest = rollouts_manifest(version("1.0.0"), version("2.0.0"), rollouts=[spec], state=state)
    async with Dispatcher(manifest) as dispatcher:

        async def runs() -> list[int]:
            return [
                await dispatcher.call("svc", "calls_seen", version=number)
                for number in ("1.0.0", "2.0.0")
            ]

        first: dict[str, Any] = {}
        for key in KEYS:
            answers = [
                await dispatcher.call("svc", "answer", {"x": 1}, idempotency_key=key)
                for _ in range(4)
            ]
            assert answers == [answers[0]] * 4, key
            first[key] = answers[0]
        ran = await runs()
        assert sum(ran) == len(KEYS) and all(ran), ran  # once per key, on both sides
        assert dispatcher.stats()["rollouts"]["svc.answer"]["calls"] == {
            "from": ran[0],
            "to": ran[1],
        }
        assert dispatcher.control_rollout("svc", "answer", "abort")["percent"] == 0
        for key in KEYS:  # every call goes to 1.0.0 now: the keys 2.0.0 ran replay its answer
            assert (
                await dispatcher.call("svc", "answer", {"x": 1}, idempotency_key=key)
                == (first[key])
            )
        assert await runs() == ran
        # Named exactly, the other version is another request: refused, as before.
        moved = next(key for key, answer in first.items() if answer["version"] == "2.0.0")
        with pytest.raises(InvalidParams, match=r"another version than 1\.0\.0;"):
            await dispatcher.call("svc", "answer", {"x": 1}, version="1.0.0", idempotency_key=moved)
        with pytest.raises(InvalidParams, match="other params"):  # through the rollout too
            await dispatcher.call("svc", "answer", {"x": 2}, idempotency_key=moved)


async def test_a_keyed_retry_goes_to_the_version_its_first_call_went_to() -> None:
    """A keyed call that failed retryably frees its key, and its retry runs: split by the
    rollout's counter, the retry went to the other version every other time (a plugin
    keeping its effects once by the key, in its own version's store, ran it twice). The
    split of keyed calls is by key."""
    spec = rollout(steps=[50, 100], interval_s=60, max_error_rate=1)
    manifest = rollouts_manifest(
        version("1.0.0", flaky=True), version("2.0.0", flaky=True), rollouts=[spec]
    )
    async with Dispatcher(manifest) as dispatcher:
        went = set()
        for key in KEYS:
            with pytest.raises(DispatchError) as failed:
                await dispatcher.call("svc", "answer", {"x": 1}, idempotency_key=key)
            assert failed.value.retryable, failed.value
            retried = await dispatcher.call("svc", "answer", {"x": 1}, idempotency_key=key)
            assert failed.value.message.startswith(retried["version"] + " flaked"), key
            went.add(retried["version"])
        assert went == {"1.0.0", "2.0.0"}


async def test_a_keyed_submission_during_a_rollout_is_one_job(
    redis_server: Redis, redis_prefix: str
) -> None:
    """Before: the version of a keyed submission came from the rollout's counter, so its
    repeat went to the other version half the time and was refused with
    ``InvalidParams`` (its record was at the first one's). It is the first job, wherever
    the split sends the repeat."""
    spec = rollout(steps=[50, 100], interval_s=60)
    manifest = rollouts_manifest(
        version("1.0.0"),
        version("2.0.0"),
        rollouts=[spec],
        state=redis_state(redis_server, redis_prefix),
        jobs={"workers": 0},
    )
    async with Dispatcher(manifest) as dispatcher:

        async def submitted(key: str) -> str:
            return await dispatcher.submit("svc", "answer", {"x": 1}, idempotency_key=key)

        jobs = {key: await submitted(key) for key in KEYS}
        assert [await submitted(key) for key in KEYS] == list(jobs.values())
        versions = {(await dispatcher.job(job_id))["version"] for job_id in jobs.values()}
        assert versions == {"1.0.0", "2.0.0"}
        dispatcher.control_rollout("svc", "answer", "abort")
        assert [await submitted(key) for key in KEYS] == list(jobs.values())


async def test_jobs_a_rollout_placed_count_toward_it_and_follow_its_rollback(
    redis_server: Redis, redis_prefix: str
) -> None:
    """Before: the rollout chose a job's version when it was submitted, and the job ran
    around the rollout: a new version that failed every job never rolled back, and half
    the jobs failed. Now a job's attempts are measured like calls, and the jobs placed on
    the new version that have not run yet follow the rollback (their records say where
    they ran)."""
    spec = rollout(steps=[50, 100], interval_s=60, max_error_rate=0.01)
    manifest = rollouts_manifest(
        version("1.0.0"),
        version("2.0.0", fail_from=1),
        rollouts=[spec],
        state=redis_state(redis_server, redis_prefix),
        jobs={"workers": 0},
    )
    async with Dispatcher(manifest) as submitter:
        jobs = [await submitter.submit("svc", "answer", {"x": n}) for n in range(20)]
        placed = [(await submitter.job(job_id))["version"] for job_id in jobs]
    assert placed.count("2.0.0") >= 3, placed  # split by job id: about half of them
    # One worker taking one job at a time: the first job on 2.0.0 is the only one to fail.
    async with Dispatcher(
        rollouts_manifest(
            version("1.0.0"),
            version("2.0.0", fail_from=1),
            rollouts=[spec],
            state=redis_state(redis_server, redis_prefix),
            jobs={"workers": 1, "batch": 1},
        )
    ) as worker:
        outcomes = []
        for job_id in jobs:
            try:
                outcomes.append((await worker.result(job_id, wait=20))["version"])
            except DispatchError as error:
                assert error.details["state"] == "failed", error
                outcomes.append("failed")
        ran = [(await worker.job(job_id))["version"] for job_id in jobs]
        stats = worker.stats()["rollouts"]["svc.answer"]
    assert stats["status"] == "rolled_back", stats
    assert outcomes.count("failed") == 1, outcomes
    first = outcomes.index("failed")
    assert placed[first] == "2.0.0" == ran[first]
    assert all(version == "1.0.0" for version in placed[:first]), placed
    assert outcomes[first + 1 :] == ["1.0.0"] * (len(jobs) - first - 1)
    assert ran[first + 1 :] == ["1.0.0"] * (len(jobs) - first - 1)


async def test_a_keyed_call_of_a_shadowed_method_runs_once() -> None:
    """Before: a shadow's route took keyed calls past the idempotency step as a
    rollout's did: every repeat ran on the primary again (and was mirrored again)."""
    spec = {
        "plugin": "svc",
        "method": "pure_answer",
        "from": "1.0.0",
        "shadow": {"version": "2.0.0", "percent": 100},
    }
    manifest = rollouts_manifest(version("1.0.0"), version("2.0.0"), rollouts=[spec])
    async with Dispatcher(manifest) as dispatcher:
        answers = [
            await dispatcher.call("svc", "pure_answer", {"x": 1}, idempotency_key="k")
            for _ in range(3)
        ]
        assert answers == [{"x": 1, "tag": "1.0.0"}] * 3
        assert await dispatcher.call("svc", "calls_seen", version="1.0.0") == 1


def test_a_shadow_of_a_method_that_is_not_pure_is_refused() -> None:
    spec = {
        "plugin": "svc",
        "method": "answer",
        "from": "1.0.0",
        "shadow": {"version": "2.0.0", "percent": 5},
    }
    with pytest.raises(ManifestError, match="pure"):
        rollouts_manifest(version("1.0.0"), version("2.0.0"), rollouts=[spec])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"to": "3.0.0"}, "no plugin svc@3.0.0"),
        ({"steps": [10, 50]}, "last step must be 100"),
        ({"steps": [50, 10, 100]}, "steps must increase"),
        ({"to": "1.0.0"}, "are one"),
        ({"method": "nope"}, "no method 'nope'"),
    ],
)
def test_rollouts_naming_what_does_not_exist_are_refused(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        rollouts_manifest(version("1.0.0"), version("2.0.0"), rollouts=[rollout(**overrides)])


SERVER = """
import socket, sys, uvicorn
from rollout_plugin import RolloutPlugin
from linchkit_plugin import PluginApp, PluginHost
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
app = PluginApp(PluginHost(RolloutPlugin()), config={"version": "2.0.0", "fail_from": 4})
uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
"""


@pytest.fixture
def failing_canary_url() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SOURCE_PATH},
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


async def test_a_canary_in_its_own_process_is_rolled_back(failing_canary_url: str) -> None:
    canary = version("2.0.0", {"provider": "http", "url": failing_canary_url})
    spec = rollout(steps=[50, 100], interval_s=30, max_error_rate=0.05, min_calls=20)
    async with Dispatcher(rollouts_manifest(version("1.0.0"), canary, rollouts=[spec])) as d:
        failed = 0
        for _ in range(200):
            if d.stats()["rollouts"]["svc.answer"]["status"] != "running":
                break
            try:
                await d.call("svc", "answer")
            except DispatchError:
                failed += 1
        stats = d.stats()["rollouts"]["svc.answer"]
        assert stats["status"] == "rolled_back"
        assert failed == stats["errors"]["to"] == 2  # 5 % of 20 is 1: the 2nd crosses it
        assert stats["calls"]["to"] == 5  # 3 answered, then the 4th and 5th failed


async def test_the_gateway_and_the_cli_show_and_steer_rollouts() -> None:
    import aiohttp
    from click.testing import CliRunner

    from dispatcher.cli import main
    from dispatcher.gateway import GatewayServer, GatewaySettings

    spec = rollout(steps=[50, 100], interval_s=60)
    settings = GatewaySettings(port=0, header_timeout=2.0, body_timeout=2.0)
    async with (
        Dispatcher(rollouts_manifest(version("1.0.0"), version("2.0.0"), rollouts=[spec])) as d,
        GatewayServer(d, settings) as server,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(f"{server.url}/v1/rollouts") as answer:
            listed = await answer.json()
        assert listed["rollouts"]["svc.answer"]["percent"] == 50
        async with session.post(f"{server.url}/v1/rollouts/svc/answer:pause") as answer:
            assert answer.status == 200
            assert (await answer.json())["rollout"]["status"] == "paused"
        async with session.post(f"{server.url}/v1/rollouts/svc/answer:explode") as answer:
            assert answer.status == 400
        async with session.post(f"{server.url}/v1/rollouts/svc/nope:pause") as answer:
            assert answer.status == 404
        runner = CliRunner()
        shown = await asyncio.to_thread(
            runner.invoke, main, ["rollout", "status", "--url", server.url]
        )
        assert shown.exit_code == 0, shown.output
        assert "svc.answer  1.0.0 -> 2.0.0  paused 50%" in shown.output
        aborted = await asyncio.to_thread(
            runner.invoke, main, ["rollout", "abort", "svc.answer", "--url", server.url]
        )
        assert aborted.exit_code == 0, aborted.output
        assert "aborted 0%" in aborted.output
        assert d.stats()["rollouts"]["svc.answer"]["status"] == "aborted"


async def test_the_cli_steers_the_rollout_of_a_plugin_whose_id_holds_dots() -> None:
    """A plugin id may hold dots: ``acme.svc.answer`` is plugin ``acme.svc``, method
    ``answer`` (``dispatcher call`` splits so). It was split at the first dot, and access
    checked for plugin ``acme``'s method ``svc.answer``, which a rule naming the version
    (``acme.svc@2.*.answer``) does not allow: 403."""
    import hashlib

    from click.testing import CliRunner

    from dispatcher.cli import main
    from dispatcher.gateway import GatewayServer, GatewaySettings

    key = "rk_rollout_operator_0123456789abcdef"
    document = {
        "version": 1,
        "plugins": [{**version(number), "id": "acme.svc"} for number in ("1.0.0", "2.0.0")],
        "rollouts": [rollout(plugin="acme.svc", steps=[50, 100], interval_s=60)],
        "auth": {
            "api_keys": [
                {
                    "principal": "operator",
                    "sha256": hashlib.sha256(key.encode()).hexdigest(),
                    "roles": ["operator"],
                }
            ]
        },
        "access": {"roles": {"operator": {"allow": ["acme.svc@2.*.answer"]}}},
    }
    settings = GatewaySettings(port=0, header_timeout=2.0, body_timeout=2.0)
    async with (
        Dispatcher(parse_manifest(document, base_dir=ROOT)) as d,
        GatewayServer(d, settings) as server,
    ):
        paused = await asyncio.to_thread(
            CliRunner().invoke,
            main,
            ["rollout", "pause", "acme.svc.answer", "--url", server.url, "--api-key", key],
        )
        assert paused.exit_code == 0, paused.output
        assert paused.output.startswith("acme.svc.answer  1.0.0 -> 2.0.0  paused 50%")
        assert d.stats()["rollouts"]["acme.svc.answer"]["status"] == "paused"


async def test_a_shadows_differences_show_no_callers_values_to_another_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Alice's calls are mirrored to a shadow that answers otherwise or fails with her
    note in its message; Bob, who may call the method too, reads the shadow's recent
    differences (the gateway, the CLI): when, which request, what kind, how long, and
    nothing of what Alice sent or got. The values are in the log at DEBUG, for the
    operator who asks for them."""
    import hashlib

    import aiohttp
    from click.testing import CliRunner

    from dispatcher.cli import main
    from dispatcher.gateway import GatewayServer, GatewaySettings

    alice_key, bob_key = "rk_shadow_alice_0123456789abcdef", "rk_shadow_bob_fedcba9876543210"
    spec = {
        "plugin": "svc",
        "method": "pure_answer",
        "from": "1.0.0",
        "shadow": {"version": "2.0.0", "percent": 100},
    }
    document = {
        "version": 1,
        "plugins": [version("1.0.0"), version("2.0.0", tag="other", fail_every=3)],
        "rollouts": [spec],
        "auth": {
            "api_keys": [
                {
                    "principal": principal,
                    "sha256": hashlib.sha256(key.encode()).hexdigest(),
                    "roles": ["user"],
                }
                for principal, key in (("alice", alice_key), ("bob", bob_key))
            ]
        },
        "access": {"roles": {"user": {"allow": ["svc.*"]}}},
    }
    settings = GatewaySettings(port=0, header_timeout=2.0, body_timeout=2.0)
    caplog.set_level(logging.DEBUG, logger="dispatcher.rollout")
    before = time.time()
    async with (
        Dispatcher(parse_manifest(document, base_dir=ROOT)) as d,
        GatewayServer(d, settings) as server,
        aiohttp.ClientSession() as session,
    ):
        request_ids = []
        for x in (1, 3, 5, 7, 9, 11):  # odd: the shadow answers otherwise, or fails
            async with session.post(
                f"{server.url}/v1/plugins/svc/methods/pure_answer",
                json={"x": x, "note": f"alice-secret-{x}"},
                headers={"X-API-Key": alice_key},
            ) as answer:
                assert answer.status == 200, await answer.text()
                assert (await answer.json())["result"]["note"] == f"alice-secret-{x}"
                request_ids.append(answer.headers["X-Request-Id"])
        deadline = time.monotonic() + 10
        shadow = d.stats()["rollouts"]["svc.pure_answer"]
        while shadow["different"] + shadow["failed"] < 6:  # all six compared
            assert time.monotonic() < deadline, shadow
            await asyncio.sleep(0.01)
            shadow = d.stats()["rollouts"]["svc.pure_answer"]
        shown, to_alice = [
            await (
                await session.get(f"{server.url}/v1/rollouts", headers={"X-API-Key": key})
            ).text()
            for key in (bob_key, alice_key)
        ]
        status, alices_status = [
            await asyncio.to_thread(
                CliRunner().invoke,
                main,
                ["rollout", "status", "--url", server.url, "--api-key", key],
            )
            for key in (bob_key, alice_key)
        ]
    assert "alice-secret" not in shown
    differences = orjson.loads(shown)["rollouts"]["svc.pure_answer"]["recent_differences"]
    assert len(differences) == 5  # the last five of six
    # A request id is shown to its own caller only: a caller may choose its own, and
    # write anything in it.
    assert not any("request_id" in each or "caller" in each for each in differences)
    alices = orjson.loads(to_alice)["rollouts"]["svc.pure_answer"]["recent_differences"]
    assert [each["request_id"] for each in alices] == request_ids[1:]
    assert not any(request_id in shown for request_id in request_ids)
    assert [(each["kind"], each.get("error")) for each in differences] == [
        ("result_differs", None),
        ("shadow_failed", "plugin_error"),  # every third call of the shadow fails
        ("result_differs", None),
        ("result_differs", None),
        ("shadow_failed", "plugin_error"),
    ]
    for each in differences:
        assert set(each) <= {"time", "request_id", "kind", "error", "primary_ms", "shadow_ms"}
        assert before <= each["time"] <= time.time()
        assert each["primary_ms"] >= 0 and each["shadow_ms"] >= 0
    assert status.exit_code == 0, status.output
    assert "alice-secret" not in status.output
    assert "-  shadow failed: plugin_error" in status.output
    assert "-  result differs" in status.output
    assert not any(request_id in status.output for request_id in request_ids)
    assert f"{request_ids[-1]}  shadow failed: plugin_error" in alices_status.output
    assert f"{request_ids[-2]}  result differs" in alices_status.output
    # The operator who turns the rollout logger down to DEBUG sees the values.
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(request_ids[0] in line and "alice-secret-1" in line for line in logged)


async def test_a_keyed_retry_naming_no_version_replays_after_a_newer_version_came(
    state: dict[str, Any],
) -> None:
    """Before: a keyed call naming no version ran at 1.0.0; once 2.0.0 was deployed its
    retry (a client retrying a call that timed out during the deploy) went to 2.0.0 and
    was refused with ``InvalidParams``. The caller asked for no version: the key's record
    at any version is its answer. A call naming a version is still held to it."""
    async with Dispatcher(rollouts_manifest(version("1.0.0"), rollouts=[], state=state)) as d:
        first = await d.call("svc", "answer", {"x": 1}, idempotency_key="order-1")
        assert first["version"] == "1.0.0"
        await d.reload(
            rollouts_manifest(version("1.0.0"), version("2.0.0"), rollouts=[], state=state)
        )
        assert await d.call("svc", "answer", {"x": 1}, idempotency_key="order-1") == first
        assert (
            await d.call("svc", "answer", {"x": 1}, version="^1", idempotency_key="order-1")
            == first
        )
        assert await d.call("svc", "calls_seen", version="2.0.0") == 0
        assert await d.call("svc", "calls_seen", version="1.0.0") == 1
        with pytest.raises(InvalidParams, match=r"another version than 2\.0\.0;"):
            await d.call("svc", "answer", {"x": 1}, version="2.0.0", idempotency_key="order-1")
        with pytest.raises(InvalidParams, match=r"with other params; a new request"):
            await d.call("svc", "answer", {"x": 2}, idempotency_key="order-1")
        fresh = await d.call("svc", "answer", {"x": 1}, idempotency_key="order-2")
        assert fresh["version"] == "2.0.0"


async def test_a_keyed_retry_replays_after_the_rollout_that_placed_it_left(
    state: dict[str, Any],
) -> None:
    """Before: a key the rollout sent to 1.0.0, retried after the rollout was taken out of
    the manifest (every call naming no version now goes to 2.0.0), was refused."""
    spec = rollout(steps=[50, 100], interval_s=60)
    plugins = (version("1.0.0"), version("2.0.0"))
    async with Dispatcher(rollouts_manifest(*plugins, rollouts=[spec], state=state)) as d:
        first = {key: await d.call("svc", "answer", {"x": 1}, idempotency_key=key) for key in KEYS}
        assert {answer["version"] for answer in first.values()} == {"1.0.0", "2.0.0"}
        await d.reload(rollouts_manifest(*plugins, rollouts=[], state=state))
        for key in KEYS:
            assert await d.call("svc", "answer", {"x": 1}, idempotency_key=key) == first[key]
        seen = [await d.call("svc", "calls_seen", version=each) for each in ("1.0.0", "2.0.0")]
        assert sum(seen) == len(KEYS)


async def test_a_keyed_submission_naming_no_version_is_one_job_after_a_newer_version_came(
    redis_server: Redis, redis_prefix: str
) -> None:
    """Before: resubmitted after 2.0.0 was deployed, a keyed submission naming no version
    was refused (its record was at 1.0.0); it is the same job."""
    sections = {"state": redis_state(redis_server, redis_prefix), "jobs": {"workers": 0}}
    async with Dispatcher(rollouts_manifest(version("1.0.0"), rollouts=[], **sections)) as d:
        job_id = await d.submit("svc", "answer", {"x": 1}, idempotency_key="order-1")
        await d.reload(
            rollouts_manifest(version("1.0.0"), version("2.0.0"), rollouts=[], **sections)
        )
        assert await d.submit("svc", "answer", {"x": 1}, idempotency_key="order-1") == job_id
        assert (await d.job(job_id))["version"] == "1.0.0"
        with pytest.raises(InvalidParams, match=r"another version than 2\.0\.0;"):
            await d.submit("svc", "answer", {"x": 1}, version="2.0.0", idempotency_key="order-1")
        with pytest.raises(InvalidParams, match=r"with other params; a new request"):
            await d.submit("svc", "answer", {"x": 2}, idempotency_key="order-1")
