"""Hot reload with real processes: ``Dispatcher.reload`` under load loses no call, an
invalid manifest changes nothing, a removed plugin's process is gone after its drain,
and ``dispatcher serve`` reloads on SIGHUP and with ``--watch``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from dispatcher import Dispatcher, ManifestError, parse_manifest
from linchkit_plugin.errors import ProviderError
from tests.conftest import EXAMPLES, LOCAL_TARGET, ROOT, echo_plugin, manifest

SOURCE_PATH = os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python")])
CRASHING = [sys.executable, str(ROOT / "tests" / "plugins" / "crashing_plugin.py")]

# The example plugin served over HTTP by the SDK, in a process of its own; prints its port.
HTTP_SERVER = f"""
import socket, sys, uvicorn
sys.path.insert(0, {str(EXAMPLES)!r})
from echo_plugin import EchoPlugin
from linchkit_plugin import PluginApp, PluginHost
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
app = PluginApp(PluginHost(EchoPlugin()), config={{"greeting": "from http"}})
config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
uvicorn.Server(config).run(sockets=[sock])
"""


@pytest.fixture
def http_plugin_url() -> Iterator[str]:
    environment = {**os.environ, "PYTHONPATH": SOURCE_PATH}
    process = subprocess.Popen(
        [sys.executable, "-c", HTTP_SERVER], stdout=subprocess.PIPE, text=True, env=environment
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        deadline = time.monotonic() + 30
        while True:  # listening once a connection is taken
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


def subprocess_plugin() -> dict[str, Any]:
    return {
        "id": "crashing",
        "version": "1.0.0",
        "target": {
            "provider": "subprocess",
            "command": CRASHING,
            "env": {"PYTHONPATH": SOURCE_PATH},
        },
        "methods": {"pid": {}, "echo": {}},
    }


def http_plugin(url: str, **say: Any) -> dict[str, Any]:
    return echo_plugin("remote", {"provider": "http", "url": url}, methods={"say": say})


def local(version: str) -> dict[str, Any]:
    return echo_plugin("fast", LOCAL_TARGET, version=version, config={"greeting": version})


def process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Still in the table: gone only if a zombie not yet reaped.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(")")[-1].split()[0] == "Z"


async def test_five_reloads_under_load_lose_no_call(http_plugin_url: str) -> None:
    first = manifest(local("1.0.0"), http_plugin(http_plugin_url), subprocess_plugin())
    steps = [
        # 1. a new version: callers of ^1 move to it
        manifest(local("1.0.0"), local("1.1.0"), http_plugin(http_plugin_url), subprocess_plugin()),
        # 2. a method's policy changes (the plugin being called)
        manifest(
            local("1.0.0"),
            local("1.1.0"),
            http_plugin(http_plugin_url, timeout_ms=4000, idempotent=True, retry={"attempts": 2}),
            subprocess_plugin(),
        ),
        # 3. a plugin nobody calls is removed: its process ends after the drain
        manifest(
            local("1.0.0"),
            local("1.1.0"),
            http_plugin(http_plugin_url, timeout_ms=4000, idempotent=True, retry={"attempts": 2}),
        ),
        # 4. the version callers of ^1 use is removed while they call it
        manifest(
            local("1.0.0"),
            http_plugin(http_plugin_url, timeout_ms=4000, idempotent=True, retry={"attempts": 2}),
        ),
        # 5. back to where it started
        manifest(local("1.0.0"), http_plugin(http_plugin_url), subprocess_plugin()),
    ]
    failures: list[BaseException] = []
    greetings: set[str] = set()
    calls = 0
    stop = asyncio.Event()

    async def caller(plugin: str, version: str | None) -> None:
        nonlocal calls
        while not stop.is_set():
            try:
                answer = await dispatcher.call(plugin, "say", {"text": "x"}, version=version)
                greetings.add(answer["greeting"])
            except Exception as error:
                failures.append(error)
            calls += 1
            await asyncio.sleep(0)

    async with Dispatcher(first) as dispatcher:
        pid = await dispatcher.call("crashing", "pid")
        http_routes = dispatcher._routes.routes_of("remote", "1.0.0")
        callers = [
            *(asyncio.create_task(caller("fast", "^1")) for _ in range(4)),
            *(asyncio.create_task(caller("remote", None)) for _ in range(4)),
        ]
        try:
            await asyncio.sleep(0.5)
            started, counted = time.monotonic(), calls
            summaries = []
            for step in steps:
                summaries.append(await dispatcher.reload(step, grace=10))
                if step is steps[0]:
                    # unchanged: same routes, same process
                    assert dispatcher._routes.routes_of("remote", "1.0.0") is http_routes
                    assert await dispatcher.call("crashing", "pid") == pid
                if step is steps[2]:
                    assert process_is_gone(pid), "the removed plugin's process still runs"
                await asyncio.sleep(0.4)
            rate = (calls - counted) / (time.monotonic() - started)
        finally:
            stop.set()
            await asyncio.gather(*callers)
        assert await dispatcher.call("crashing", "pid") != pid  # attached anew in step 5
    print(f"{calls} calls, {rate:.0f} calls/s during 5 reloads")
    assert failures == []
    assert summaries[0]["added"] == ["fast@1.1.0"]
    assert summaries[1]["changed"] == ["remote@1.0.0"]
    assert summaries[2]["removed"] == ["crashing@1.0.0"]
    assert summaries[3]["removed"] == ["fast@1.1.0"]
    assert {"1.0.0", "1.1.0", "from http"} <= greetings
    assert calls > 1000


async def test_an_invalid_manifest_on_reload_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "plugins.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "plugins": [local("1.0.0")]}))
    async with Dispatcher.from_file(path) as dispatcher:
        routes, current = dispatcher._routes, dispatcher.manifest
        broken = [
            "plugins: [{id: fast, version: one}]\n",  # not a semantic version
            "plugins: [\n",  # not YAML
            yaml.safe_dump(
                {"version": 1, "plugins": [local("1.0.0")], "state": {"key_prefix": "x:"}}
            ),
            yaml.safe_dump(
                {"version": 1, "plugins": [{**local("1.0.0"), "config": {"greeting": "other"}}]}
            ),
            yaml.safe_dump({"version": 1, "plugins": [{**local("2.0.0"), "protocol": 9}]}),
        ]
        messages = []
        for text in broken:
            path.write_text(text)
            with pytest.raises((ManifestError, ProviderError)) as refused:
                await dispatcher.reload_from_file()
            messages.append(str(refused.value))
            assert dispatcher._routes is routes and dispatcher.manifest is current
            assert (await dispatcher.call("fast", "say", {"text": "x"}))["greeting"] == "1.0.0"
        assert "expected a semantic version" in messages[0]
        assert "state: cannot change while the dispatcher runs" in messages[2]
        assert "plugins[0].config: fast@1.0.0 is running with another config" in messages[3]
        assert "speaks plugin protocol 9" in messages[4]
        # a valid one then applies
        path.write_text(yaml.safe_dump({"version": 1, "plugins": [local("1.0.0"), local("2.0.0")]}))
        assert (await dispatcher.reload_from_file())["added"] == ["fast@2.0.0"]
        assert (await dispatcher.call("fast", "say", {"text": "x"}))["greeting"] == "2.0.0"


async def test_a_removed_plugin_finishes_its_calls_in_flight_before_it_detaches() -> None:
    slow = {**subprocess_plugin(), "methods": {"nap": {}, "pid": {}}}
    async with Dispatcher(manifest(local("1.0.0"), slow)) as dispatcher:
        pid = await dispatcher.call("crashing", "pid")
        napping = asyncio.create_task(dispatcher.call("crashing", "nap", {"seconds": 0.5}))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await dispatcher.reload(manifest(local("1.0.0")), grace=10)
        assert time.monotonic() - started >= 0.3  # it waited for the nap
        assert await napping == 0.5
        assert process_is_gone(pid)


async def serve(tmp_path: Path, *options: str) -> tuple[asyncio.subprocess.Process, str, Path]:
    path = tmp_path / "plugins.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "plugins": [local("1.0.0")]}))
    environment = {**os.environ, "PYTHONPATH": SOURCE_PATH}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher.cli", "-m", str(path), "serve", "--port", "0", *options,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )  # fmt: skip
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    assert line.startswith("listening on http://127.0.0.1:"), line
    return process, line.split()[-1], path


async def greeting_over_http(url: str, version: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/v1/plugins/fast/methods/say",
            json={"text": "x"},
            headers={"X-Plugin-Version": version},
        ) as answer,
    ):
        body = await answer.json()
        return answer.status, body.get("result", body.get("error"))


async def eventually(check: Any, seconds: float = 20) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        result = await check()
        if result[0] == 200 or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("how", ["sighup", "watch"])
async def test_serve_reloads_its_manifest_on_sighup_and_with_watch(
    tmp_path: Path, how: str
) -> None:
    options = ("--watch", "0.1") if how == "watch" else ()
    process, url, path = await serve(tmp_path, *options)
    try:
        status, error = await greeting_over_http(url, "^2")
        assert (status, error["type"]) == (404, "plugin_not_found")
        assert "satisfies '^2'; it has: 1.0.0" in error["message"]
        path.write_text("plugins: [\n")  # invalid: logged, nothing changes
        if how == "sighup":
            process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert (await greeting_over_http(url, "^1"))[0] == 200
        path.write_text(yaml.safe_dump({"version": 1, "plugins": [local("1.0.0"), local("2.1.0")]}))
        if how == "sighup":
            process.send_signal(signal.SIGHUP)
        status, result = await eventually(lambda: greeting_over_http(url, "^2"))
        assert (status, result["greeting"]) == (200, "2.1.0")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        assert process.stderr is not None
        logged = (await process.stderr.read()).decode()
        assert "manifest not reloaded, nothing changed" in logged
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_serve_watch_sees_a_file_added_to_an_included_folder(tmp_path: Path) -> None:
    process, url, path = await serve(tmp_path, "--watch", "0.1")
    try:
        included = tmp_path / "plugins.d"
        included.mkdir()
        path.write_text(
            yaml.safe_dump(
                {"version": 1, "include": ["plugins.d/*.yaml"], "plugins": [local("1.0.0")]}
            )
        )
        await asyncio.sleep(0.5)  # the include itself applied: nothing added yet
        assert (await greeting_over_http(url, "^2"))[0] == 404
        (included / "fast-2.yaml").write_text(yaml.safe_dump({"plugins": [local("2.0.0")]}))
        status, result = await eventually(lambda: greeting_over_http(url, "^2"))
        assert (status, result["greeting"]) == (200, "2.0.0")
        (included / "fast-2.yaml").unlink()  # removing the file drains the version
        await eventually(lambda: _inverted(greeting_over_http(url, "^2")))
        assert (await greeting_over_http(url, "^2"))[0] == 404
        assert (await greeting_over_http(url, "^1"))[0] == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _inverted(answer: Any) -> tuple[int, Any]:
    """200 once the version is gone (for ``eventually``)."""
    status, body = await answer
    return (200 if status == 404 else 0), body


def test_reload_plan_is_decided_without_io() -> None:
    from dispatcher._reload import plan_reload

    old = manifest(local("1.0.0"), local("1.1.0"))
    new = parse_manifest(
        {
            "version": 1,
            "plugins": [local("1.1.0"), {**local("1.0.0"), "description": "d"}, local("2.0.0")],
        }
    )
    plan = plan_reload(old, new, source="x").summary()
    assert plan == {
        "added": ["fast@2.0.0"],
        "removed": [],
        "changed": ["fast@1.0.0"],
        "kept": ["fast@1.1.0"],
    }
    with pytest.raises(ManifestError, match="telemetry: cannot change"):
        plan_reload(
            old,
            parse_manifest({"version": 1, "telemetry": {"metrics": {"enabled": True}}}),
            source="x",
        )


async def test_reloads_that_replace_a_version_leave_none_of_its_policy_state() -> None:
    """Five reloads, each replacing the version: ``stats()`` listed every removed version's
    cache (entries and all), limit, bulkhead and retry counter for good, and a removed
    version's batcher kept its task."""
    methods = {
        "say": {"pure": True, "cache": {"ttl_ms": 60_000}},
        "withdraw": {
            "rate_limit": {"rate": 1000, "burst": 10, "scope": "method"},
            "concurrency": {"max_in_flight": 4, "scope": "method"},
        },
        "digest": {"idempotent": True, "retry": {"attempts": 2}},
        "sleep": {"batch": {"max_size": 10, "max_wait_ms": 5}},
    }

    def version(number: int) -> Any:
        entry = echo_plugin("echo", LOCAL_TARGET, methods=methods)
        return manifest({**entry, "version": f"{number}.0.0"})

    async with Dispatcher(version(1)) as dispatcher:
        runtime = dispatcher.policies
        assert runtime is not None
        for number in range(2, 7):
            await dispatcher.call("echo", "say", {"text": f"v{number}"})
            await dispatcher.reload(version(number))
        before = set(asyncio.all_tasks())
        stats = dispatcher.stats()
        assert list(stats["caches"]) == ["echo@6.0.0.say"]
        assert len(stats["rate_limits"]) == 1
        assert len(stats["bulkheads"]) == 1
        assert list(stats["retries"]) == ["echo@6.0.0.digest"]
        assert list(runtime.batchers) == [("echo@6.0.0", "sleep")]
        assert await dispatcher.call("echo", "sleep", {"seconds": 0}) >= 0  # batched, answered
    assert not {task for task in asyncio.all_tasks() - before if not task.done()}


async def test_a_changed_version_drops_the_state_of_the_methods_it_no_longer_has(
    http_plugin_url: str,
) -> None:
    """A reload keeps the version and drops three of its methods: what they owned (a
    limit, a bulkhead and a fallback; a retry counter and keyed-call records; a batcher
    and its task) goes once their calls in flight have ended, as a removed version's
    does. Before, only removed versions' state was dropped: the dropped methods' stayed
    in ``stats()`` for the life of the process, and the batcher's task ran until the close."""
    methods: dict[str, Any] = {
        "say": {"pure": True, "cache": {"ttl_ms": 60_000}},
        "withdraw": {
            "rate_limit": {"rate": 1000, "burst": 10, "scope": "method"},
            "concurrency": {"max_in_flight": 4, "scope": "method"},
            "fallback": {"plugin": "backup", "on": ["target_unavailable"]},
        },
        "digest": {"idempotent": True, "retry": {"attempts": 2}},
        "sleep": {"batch": {"max_size": 1}, "timeout_ms": 30_000},
    }
    target = {"provider": "http", "url": http_plugin_url}
    backup = echo_plugin("backup", LOCAL_TARGET, methods={"withdraw": {}})
    whole = echo_plugin("echo", target, methods=methods)
    fewer = {**whole, "methods": {"say": methods["say"]}}
    async with Dispatcher(manifest(whole, backup)) as dispatcher:
        runtime = dispatcher.policies
        assert runtime is not None
        batcher = runtime.batchers[("echo@1.0.0", "sleep")]
        sleeping = asyncio.create_task(dispatcher.call("echo", "sleep", {"seconds": 1.0}))
        await asyncio.sleep(0.2)
        summary = await dispatcher.reload(manifest(fewer, backup), grace=30)
        assert summary["changed"] == ["echo@1.0.0"]
        assert sleeping.done() and sleeping.result() > 0.5  # ended, before its batcher
        assert batcher._closed
        stats = dispatcher.stats()
        assert list(stats["caches"]) == ["echo@1.0.0.say"]
        assert not stats["retries"] and not stats["fallbacks"]
        assert not stats["rate_limits"] and not stats["bulkheads"] and not stats["batchers"]
        assert list(stats["idempotency"]) == ["echo@1.0.0.say", "backup@1.0.0.withdraw"]
        assert set(runtime.gates) == {("echo@1.0.0", "say"), ("backup@1.0.0", "withdraw")}
        assert (await dispatcher.call("echo", "say", {"text": "still"}))["text"] == "still"


async def test_reloads_that_move_a_plugin_to_other_targets_leave_none_of_their_state() -> None:
    """Five reloads, each moving a plugin to another URL: its breaker, retry budget,
    bulkhead and rate limit are kept by target, not by version, and ``stats()`` listed
    every URL it ever had, for good. What a kept plugin's target has stays as it is."""
    policies = {
        "breaker": {"fail_max": 3, "reset_timeout_ms": 1000},
        "idempotent": True,
        "retry": {"attempts": 2},
        "concurrency": {"max_in_flight": 4, "scope": "target"},
        "rate_limit": {"rate": 1000, "burst": 10, "scope": "target"},
    }

    def plugin(plugin_id: str, host: str) -> dict[str, Any]:
        target = {"provider": "http", "url": f"http://{host}:9"}
        return {"id": plugin_id, "version": "1.0.0", "target": target, "methods": {"say": policies}}

    fleet = {
        "id": "fleet",
        "version": "1.0.0",
        "target": {
            "provider": "http",
            "instances": [{"url": "http://127.0.0.101:9"}, {"url": "http://127.0.0.102:9"}],
        },
        "methods": {"say": policies},
    }

    def moved(number: int) -> Any:
        return manifest(plugin("kept", "127.0.0.100"), fleet, plugin("moving", f"127.0.0.{number}"))

    async with Dispatcher(moved(2)) as dispatcher:
        runtime = dispatcher.policies
        assert runtime is not None
        kept = {each for each in runtime.targets.breakers.values() if "127.0.0.10" in each.name}
        assert len(kept) == 3  # the kept plugin's, and one per instance of the fleet
        for number in range(3, 8):
            await dispatcher.reload(moved(number))
        stats = dispatcher.stats()
        hosts = {"127.0.0.100", "127.0.0.101", "127.0.0.102", "127.0.0.7"}
        assert {name.split("//")[1].split(":")[0] for name in stats["breakers"]} == hosts
        assert len(stats["retry_budgets"]) == 3  # the fleet's is the fleet's own
        assert len(stats["bulkheads"]) == 3
        assert len(stats["rate_limits"]) == 3
        assert kept <= set(runtime.targets.breakers.values())


async def test_serve_logs_a_reload_once_at_info_in_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What ``dispatcher serve`` logs on SIGHUP or ``--watch``: one INFO line that says what
    changed, its own wording when nothing did, an ERROR when the file is refused."""
    from dispatcher.cli.serve import _reload

    path = tmp_path / "plugins.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "plugins": [local("1.0.0")]}))
    caplog.set_level(logging.INFO, logger="dispatcher")
    async with Dispatcher.from_file(path) as dispatcher:

        async def reload_logs() -> list[logging.LogRecord]:
            caplog.clear()
            await _reload(dispatcher, str(path), 1.0)
            return [r for r in caplog.records if "reloaded" in r.getMessage()]

        path.write_text(yaml.safe_dump({"version": 1, "plugins": [local("1.0.0"), local("2.0.0")]}))
        (added,) = await reload_logs()
        assert (added.levelname, added.getMessage()) == (
            "INFO",
            f"reloaded {path}: added fast@2.0.0; kept 1 unchanged",
        )
        path.write_text(yaml.safe_dump({"version": 1, "plugins": [local("2.0.0")]}))
        (removed,) = await reload_logs()
        assert removed.getMessage() == f"reloaded {path}: removed fast@1.0.0; kept 1 unchanged"
        (same,) = await reload_logs()
        assert (same.levelname, same.getMessage()) == (
            "INFO",
            f"reloaded {path}: nothing changed (1 plugin version kept)",
        )
        path.write_text("plugins: [\n")
        (refused,) = await reload_logs()
        assert refused.levelname == "ERROR"
        assert refused.getMessage().startswith("manifest not reloaded, nothing changed: ")


async def test_serve_logs_a_target_that_cannot_start_in_one_line_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload naming a plugin whose target cannot start (an executable not built) is the
    operator's mistake, not the dispatcher's bug: the ERROR line says why, in words, as
    for a manifest that does not load, with no traceback that only repeats it."""
    from dispatcher.cli.serve import _reload

    path = tmp_path / "plugins.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "plugins": [local("1.0.0")]}))
    missing = tmp_path / "not-built" / "plugin"
    unbuilt = echo_plugin("unbuilt", {"provider": "subprocess", "command": [str(missing)]})
    caplog.set_level(logging.INFO, logger="dispatcher")
    async with Dispatcher.from_file(path) as dispatcher:
        path.write_text(yaml.safe_dump({"version": 1, "plugins": [local("1.0.0"), unbuilt]}))
        await _reload(dispatcher, str(path), 1.0)
        (refused,) = [r for r in caplog.records if "not reloaded" in r.getMessage()]
        assert refused.levelname == "ERROR"
        assert refused.getMessage() == (
            "manifest not reloaded, nothing changed: "
            f"unbuilt@1.0.0: cannot start {missing}: no such file (is the plugin built?)"
        )
        assert refused.exc_info is None
        assert [plugin.key for plugin in dispatcher.manifest.plugins] == ["fast@1.0.0"]
