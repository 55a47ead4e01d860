"""Plugin entries published in etcd (``registry:``): a real etcd, real HTTP plugin servers
(processes) on 127.0.0.1. Publishing an entry attaches it, a new version takes ``^`` callers, deleting one
drains it; entries off the trust rules are left out (never quoted) while the others apply;
etcd going away keeps the last entries; a file reload keeps the registry's; callers under
load during all of it see no failure."""

from __future__ import annotations

import asyncio
import contextlib
import json
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

import pytest
import yaml

from dispatcher import Dispatcher, ManifestError, parse_manifest
from dispatcher.config import RegistryConfig
from dispatcher.config.registry import entry_item
from linchkit_plugin.errors import PluginNotFound
from tests.conftest import LOCAL_TARGET, ROOT, echo_plugin
from tests.services import Etcd, until, wait_for
from tests.test_cli import BIN
from tests.test_reload import HTTP_SERVER, SOURCE_PATH

#: Written into hostile values: it must show up in no log line, stat or health report.
SECRET = "s3cr3t-do-not-echo"


@pytest.fixture
def greeters() -> Iterator[dict[str, str]]:
    """Two HTTP servers of the example plugin, processes of their own, answering greetings
    "one" and "two"."""
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(plugin_server(name)) for name in ("one", "two")}


@contextlib.contextmanager
def plugin_server(greeting: str) -> Iterator[str]:
    script = HTTP_SERVER.replace('"from http"', repr(greeting))
    environment = {**os.environ, "PYTHONPATH": SOURCE_PATH}
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=environment
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        wait_for(lambda: _listening(port), what=f"the {greeting} plugin server")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def manifest_with_registry(etcd: Etcd, prefix: str, **registry: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "plugins": [echo_plugin("main", LOCAL_TARGET)],
        "registry": {"etcd": etcd.url, "prefix": prefix, "debounce_ms": 50, **registry},
    }


def entry(url: str, version: str = "1.0.0", plugin_id: str = "echo", **extra: Any) -> str:
    return json.dumps(
        {
            "id": plugin_id,
            "version": version,
            "target": {"provider": "http", "url": url},
            "methods": {"say": {}},
            **extra,
        }
    )


def dispatcher_for(document: dict[str, Any]) -> Dispatcher:
    return Dispatcher(parse_manifest(document, base_dir=ROOT))


def keys(dispatcher: Dispatcher) -> set[str]:
    return {plugin.key for plugin in dispatcher.manifest.plugins}


async def greeting(dispatcher: Dispatcher, version: str | None = "^1") -> str:
    answer = await dispatcher.call("echo", "say", {"text": "x"}, version=version)
    return str(answer["greeting"])


async def test_publish_a_new_version_and_delete_under_load_lose_no_call(
    etcd: Etcd, etcd_prefix: str, greeters: dict[str, str]
) -> None:
    failures: list[BaseException] = []
    seen: list[str] = []
    stop = asyncio.Event()

    async def caller(dispatcher: Dispatcher) -> None:
        while not stop.is_set():
            try:
                seen.append(await greeting(dispatcher))
            except Exception as error:
                failures.append(error)
            await asyncio.sleep(0)

    async with dispatcher_for(manifest_with_registry(etcd, etcd_prefix)) as dispatcher:
        etcd.put(f"{etcd_prefix}/echo@1.0.0", entry(greeters["one"]))
        await until(lambda: "echo@1.0.0" in keys(dispatcher), "the published entry")
        assert await greeting(dispatcher) == "one"
        began = time.monotonic()
        callers = [asyncio.create_task(caller(dispatcher)) for _ in range(8)]
        try:
            await asyncio.sleep(0.3)
            published = time.monotonic()
            etcd.put(f"{etcd_prefix}/echo@1.1.0", entry(greeters["two"], "1.1.0"))
            await until(lambda: seen[-40:].count("two") == 40, "^1 callers on 1.1.0")
            rolled_out = time.monotonic() - published
            await asyncio.sleep(0.3)
            etcd.delete(f"{etcd_prefix}/echo@1.1.0")
            await until(lambda: "echo@1.1.0" not in keys(dispatcher), "1.1.0 removed")
            await until(lambda: seen[-40:].count("one") == 40, "^1 callers back on 1.0.0")
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*callers)
        rate = len(seen) / (time.monotonic() - began)
        print(
            f"{len(seen)} calls ({rate:.0f}/s) through publish, new version, delete;"
            f" {len(failures)} failed; 1.1.0 took every ^1 call {rolled_out:.2f} s after its put"
        )
        assert failures == []
        assert len(seen) > 1000
        with pytest.raises(PluginNotFound):
            await greeting(dispatcher, "1.1.0")
        etcd.delete(f"{etcd_prefix}/echo@1.0.0")
        await until(lambda: "echo@1.0.0" not in keys(dispatcher), "the deleted entry gone")
        with pytest.raises(PluginNotFound):
            await greeting(dispatcher)
        assert keys(dispatcher) == {"main@1.0.0"}  # the file's plugin never moved
        stats = dispatcher.stats()["registry"]
        assert stats["error"] is None
        assert stats["apply_error"] is None
        assert stats["applied"] >= 4


async def test_entries_off_the_rules_are_left_out_and_the_others_apply(
    etcd: Etcd, etcd_prefix: str, greeters: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    url = greeters["one"]
    hostile = {
        "echo@9.0.0": f"not: [json, nor: yaml {SECRET}",
        "echo@9.0.1": entry(url, "9.0.1", config={"pad": SECRET * 10_000}),
        "echo@9.0.2": json.dumps(
            {
                "id": "echo",
                "version": "9.0.2",
                "target": {**LOCAL_TARGET, "entrypoint": f"{SECRET}:X"},
                "methods": {"say": {}},
            }
        ),
        "echo@9.9.9": entry(url, "9.0.3", description=SECRET),  # the key lies
        "echo@9.0.4": entry(url, "9.0.4", config={"token": "${HOME}" + SECRET}),
        "echo@9.0.5": json.dumps(
            {
                "id": "echo",
                "version": "9.0.5",
                "target": {"provider": "grpc", "address": "127.0.0.1:1", "ca_file": "/etc/x"},
                "methods": {"say": {}},
            }
        ),
        "echo@9.0.6": entry("http://169.254.169.254", "9.0.6", description=SECRET),
        "echo@9.0.7": entry(url, "9.0.7", methods={"say": {"timeout_ms": SECRET}}),
        "other@1.0.0": entry(url, plugin_id="other", description=SECRET),
    }
    good = yaml.safe_dump(json.loads(entry(url, "1.0.0")))  # YAML text works too
    caplog.set_level(logging.WARNING, logger="dispatcher")
    for name, value in hostile.items():
        etcd.put(f"{etcd_prefix}/{name}", value)
    etcd.put(f"{etcd_prefix}/echo@1.0.0", good)
    document = manifest_with_registry(etcd, etcd_prefix, trust={"allow_plugins": ["echo"]})
    async with dispatcher_for(document) as dispatcher:
        await until(lambda: "echo@1.0.0" in keys(dispatcher), "the good entry")
        assert await greeting(dispatcher) == "one"
        assert keys(dispatcher) == {"main@1.0.0", "echo@1.0.0"}
        stats = dispatcher.stats()["registry"]
        skipped = {key.rsplit("/", 1)[1]: reason for key, reason in stats["skipped"].items()}
        assert set(skipped) == set(hostile)
        assert "neither JSON nor YAML" in skipped["echo@9.0.0"]
        assert "over 65536 bytes" in skipped["echo@9.0.1"]
        assert "provider 'local' is not in trust.allow_providers" in skipped["echo@9.0.2"]
        assert "does not name the entry's own id@version" in skipped["echo@9.9.9"]
        assert "environment" in skipped["echo@9.0.4"]
        assert "file of the host" in skipped["echo@9.0.5"]
        assert "egress" in skipped["echo@9.0.6"] or "link-local" in skipped["echo@9.0.6"]
        assert "timeout_ms" in skipped["echo@9.0.7"]
        assert "trust.allow_plugins" in skipped["other@1.0.0"]
        reports = await dispatcher.health()
        left_out = [report for report in reports if report.source == "registry"]
        assert len(left_out) == 1 + len(hostile)
        assert all(report.health.status == "not_serving" for report in left_out[1:])
        shown = json.dumps(stats) + repr(reports) + caplog.text
        assert SECRET not in shown
        # logged once each, however often the registry is read again
        assert caplog.text.count("left out") == len(hostile)


async def test_etcd_going_away_keeps_the_entries_and_its_return_applies_again(
    own_etcd: Etcd, etcd_prefix: str, greeters: dict[str, str]
) -> None:
    document = manifest_with_registry(own_etcd, etcd_prefix, timeout_ms=300, retry_ms=50)
    own_etcd.put(f"{etcd_prefix}/echo@1.0.0", entry(greeters["one"]))
    async with dispatcher_for(document) as dispatcher:
        assert "echo@1.0.0" in keys(dispatcher)  # read at start
        registry = dispatcher.registry
        assert registry is not None
        own_etcd.stop()
        await until(lambda: registry.error is not None, "the registry's error")
        await asyncio.sleep(0.5)  # several failed reads later
        assert await greeting(dispatcher) == "one"
        assert "keeping the last 1 entries" in (registry.error or "")
        health = (await dispatcher.health())[0]
        assert health.health.status == "not_serving"
        own_etcd.start()
        await until(lambda: registry.error is None, "etcd read again", timeout=60)
        own_etcd.put(f"{etcd_prefix}/echo@1.1.0", entry(greeters["two"], "1.1.0"))
        await until(lambda: "echo@1.1.0" in keys(dispatcher), "a change after etcd returned")
        assert await greeting(dispatcher) == "two"


async def test_an_etcd_frozen_under_the_entries_watch_is_said_after_idle_probe_ms(
    own_etcd: Etcd, etcd_prefix: str, greeters: dict[str, str]
) -> None:
    """A frozen etcd (SIGSTOP) keeps its connections open and the watch silent: after
    ``idle_probe_ms`` of silence the registry asks etcd a small read, and one unanswered
    is the registry's error; the entries stay in use, and a change once etcd runs again
    applies. Before the setting, the probe came after a fixed 10 s."""
    document = manifest_with_registry(
        own_etcd, etcd_prefix, timeout_ms=300, retry_ms=50, idle_probe_ms=400
    )
    own_etcd.put(f"{etcd_prefix}/echo@1.0.0", entry(greeters["one"]))
    async with dispatcher_for(document) as dispatcher:
        registry = dispatcher.registry
        assert registry is not None
        await asyncio.sleep(1.0)  # silent, etcd answering: a quiet registry, no error
        assert registry.error is None
        assert own_etcd.process is not None
        own_etcd.process.send_signal(signal.SIGSTOP)
        try:
            said = await until(lambda: registry.error, "the registry's error", timeout=5)
            assert "the watch went silent and etcd does not answer" in said, said
            assert await greeting(dispatcher) == "one"
        finally:
            own_etcd.process.send_signal(signal.SIGCONT)
        await until(lambda: registry.error is None, "etcd read again", timeout=30)
        own_etcd.put(f"{etcd_prefix}/echo@1.1.0", entry(greeters["two"], "1.1.0"))
        await until(lambda: "echo@1.1.0" in keys(dispatcher), "a change after etcd ran again")


async def test_a_dispatcher_starts_without_its_registry_and_takes_entries_later(
    own_etcd: Etcd, etcd_prefix: str, greeters: dict[str, str]
) -> None:
    document = manifest_with_registry(own_etcd, etcd_prefix, timeout_ms=300, retry_ms=50)
    own_etcd.stop()
    async with dispatcher_for(document) as dispatcher:
        assert keys(dispatcher) == {"main@1.0.0"}
        own_etcd.start()
        own_etcd.put(f"{etcd_prefix}/echo@1.0.0", entry(greeters["one"]))
        await until(lambda: "echo@1.0.0" in keys(dispatcher), "the entry", timeout=60)
        assert await greeting(dispatcher) == "one"


async def test_a_file_reload_keeps_the_registry_entries_and_a_bad_merge_changes_nothing(
    etcd: Etcd, etcd_prefix: str, greeters: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "plugins.yaml"
    document = manifest_with_registry(etcd, etcd_prefix)
    document["plugins"][0]["target"] = {"provider": "http", "url": greeters["two"]}
    path.write_text(yaml.safe_dump(document))
    etcd.put(f"{etcd_prefix}/echo@1.0.0", entry(greeters["one"]))
    async with Dispatcher.from_file(path) as dispatcher:
        assert keys(dispatcher) == {"main@1.0.0", "echo@1.0.0"}
        document["plugins"].append(echo_plugin("added", LOCAL_TARGET))
        path.write_text(yaml.safe_dump(document))
        summary = await dispatcher.reload_from_file()
        assert summary["added"] == ["added@1.0.0"]
        assert "echo@1.0.0" in summary["kept"]
        # The file now declares the version the registry publishes: the entry is left out
        # (the file wins), named in skipped.
        document["plugins"].append(json.loads(entry(greeters["one"])))
        path.write_text(yaml.safe_dump(document))
        await dispatcher.reload_from_file()
        assert "file declares" in next(iter(dispatcher.registry.skipped.values()))  # type: ignore[union-attr]
        # A file changing the registry section is refused whole: restart to change it.
        document["registry"]["prefix"] = etcd_prefix + "-other"
        path.write_text(yaml.safe_dump(document))
        before = keys(dispatcher)
        with pytest.raises(ManifestError, match="registry"):
            await dispatcher.reload_from_file()
        assert keys(dispatcher) == before


async def test_closing_the_dispatcher_ends_the_registry_tasks(etcd: Etcd, etcd_prefix: str) -> None:
    async with dispatcher_for(manifest_with_registry(etcd, etcd_prefix)) as dispatcher:
        registry = dispatcher.registry
        assert registry is not None
        tasks = list(registry._tasks)
        assert tasks and not any(task.done() for task in tasks)
    assert all(task.done() for task in tasks)
    assert registry._tasks == []


def test_trust_rules_without_etcd() -> None:
    config = RegistryConfig.model_validate(
        {"etcd": "http://127.0.0.1:2379", "prefix": "/p", "trust": {"max_entry_bytes": 512}}
    )
    item = entry_item("/p/a@1.0.0", entry("http://127.0.0.1:1", plugin_id="a").encode(), config)
    assert item["id"] == "a"
    for value, reason in [
        (b"[1, 2]", "not a mapping"),
        (b"\xff\xfe", "neither JSON nor YAML"),
        (b"x" * 513, "over 512 bytes"),
        (entry("http://127.0.0.1:1", plugin_id="b").encode(), "own id@version"),
        (
            json.dumps(
                {
                    "id": "a",
                    "version": "1.0.0",
                    "target": {
                        "provider": "http",
                        "instances": [{"registry": {"etcd": "http://10.9.9.9", "prefix": "/x"}}],
                    },
                    "methods": {"say": {}},
                }
            ).encode(),
            "fixed instances only",
        ),
    ]:
        with pytest.raises(ValueError, match=reason):
            entry_item("/p/a@1.0.0", value, config)
    wide = RegistryConfig.model_validate(
        {"etcd": "http://127.0.0.1:2379", "prefix": "/p", "trust": {"allow_providers": []}}
    )
    with pytest.raises(ValueError, match="none"):
        entry_item("/p/a@1.0.0", entry("http://127.0.0.1:1", plugin_id="a").encode(), wide)


def test_dispatcher_health_lists_each_entry_left_out_with_its_reason(
    etcd: Etcd, etcd_prefix: str, tmp_path: Path
) -> None:
    etcd.put(f"{etcd_prefix}/echo@1.0.0", entry("http://127.0.0.1:1", description=SECRET))
    etcd.put(f"{etcd_prefix}/echo@2.0.0", entry("http://127.0.0.1:1", "2.0.1", config=SECRET))
    path = tmp_path / "plugins.yaml"
    path.write_text(yaml.safe_dump(manifest_with_registry(etcd, etcd_prefix)))
    ran = subprocess.run(
        [str(BIN / "dispatcher"), "-m", str(path), "health", "--output", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    rows = {row["target"]: row for row in json.loads(ran.stdout) if row["plugin"] == "registry"}
    assert ran.returncode == 1  # an entry left out (and a target down) is not healthy
    assert rows[f"etcd {etcd.url} {etcd_prefix}"]["status"] == "serving"
    left_out = rows[f"{etcd_prefix}/echo@2.0.0"]
    assert left_out["status"] == "not_serving"
    assert "own id@version" in left_out["detail"]
    assert SECRET not in ran.stdout + ran.stderr


async def test_a_running_version_republished_with_other_config_keeps_running(
    etcd: Etcd, etcd_prefix: str, greeters: dict[str, str]
) -> None:
    async with dispatcher_for(manifest_with_registry(etcd, etcd_prefix)) as dispatcher:
        etcd.put(f"{etcd_prefix}/echo@1.0.0", entry(greeters["one"], config={"a": 1}))
        await until(lambda: "echo@1.0.0" in keys(dispatcher), "the entry")
        registry = dispatcher.registry
        assert registry is not None
        etcd.put(f"{etcd_prefix}/echo@1.0.0", entry(greeters["two"], config={"a": 2}))
        await until(lambda: registry.skipped, "the republished entry left out")
        assert (
            "publish the change as a new version" in registry.skipped[f"{etcd_prefix}/echo@1.0.0"]
        )
        assert registry.apply_error is None  # other changes are not held up
        etcd.put(f"{etcd_prefix}/echo@1.1.0", entry(greeters["two"], "1.1.0"))
        await until(lambda: "echo@1.1.0" in keys(dispatcher), "a later entry")
        assert await greeting(dispatcher, "1.0.0") == "one"


async def test_a_deleted_entry_finishes_its_calls_in_flight_before_it_goes(
    etcd: Etcd, etcd_prefix: str, greeters: dict[str, str]
) -> None:
    slow = entry(greeters["one"], methods={"say": {}, "sleep": {}})
    etcd.put(f"{etcd_prefix}/echo@1.0.0", slow)
    async with dispatcher_for(manifest_with_registry(etcd, etcd_prefix)) as dispatcher:
        assert "echo@1.0.0" in keys(dispatcher)
        in_flight = asyncio.create_task(dispatcher.call("echo", "sleep", {"seconds": 1.5}))
        await asyncio.sleep(0.2)
        etcd.delete(f"{etcd_prefix}/echo@1.0.0")
        await until(lambda: "echo@1.0.0" not in keys(dispatcher), "the entry removed")
        with pytest.raises(PluginNotFound):
            await greeting(dispatcher)  # new calls: gone at once
        assert await in_flight > 1.4  # the call in flight slept its time out on its server


async def test_a_registry_that_lies_leaves_the_file_plugins_serving() -> None:
    async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"header": {"revision": "1"}, "kvs": "' + SECRET.encode() + b'"}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(liar, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    document = {
        "version": 1,
        "plugins": [echo_plugin("main", LOCAL_TARGET)],
        "registry": {"etcd": f"http://127.0.0.1:{port}", "prefix": "/p", "retry_ms": 50},
    }
    try:
        async with dispatcher_for(document) as dispatcher:
            registry = dispatcher.registry
            assert registry is not None
            assert "no list of keys" in (registry.error or "")
            await asyncio.sleep(0.3)  # read again, and again
            assert keys(dispatcher) == {"main@1.0.0"}
            assert (await dispatcher.call("main", "say", {"text": "x"}))["text"] == "x"
            assert SECRET not in json.dumps(dispatcher.stats()["registry"])
    finally:
        server.close()
        await server.wait_closed()
