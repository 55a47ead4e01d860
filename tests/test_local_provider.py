"""In-process plugins: lifecycle, sync methods off the loop, errors, events, deadlines."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import recording_plugin

from dispatcher import (
    DeadlineExceeded,
    Dispatcher,
    InvalidParams,
    ManifestError,
    MethodNotFound,
    PluginError,
    ProviderError,
)
from linchkit_plugin.host import PluginHost
from tests.conftest import manifest

RECORDING = {"provider": "local", "entrypoint": "recording_plugin:RecordingPlugin"}


def recording(**extra: Any) -> dict[str, Any]:
    return {
        "id": "rec",
        "version": "1.0.0",
        "config": {"colour": "blue"},
        "target": RECORDING,
        "methods": {"blocking": {}, "shout": {}, "broken": {}},
        **extra,
    }


async def test_lifecycle_runs_in_order_once() -> None:
    recording_plugin.EVENTS.clear()
    async with Dispatcher(manifest(recording())) as dispatcher:
        assert recording_plugin.EVENTS == ["init {'colour': 'blue'}", "start"]
        assert await dispatcher.call("rec", "shout", {"text": "hi"}) == "HI"
    assert recording_plugin.EVENTS == ["init {'colour': 'blue'}", "start", "stop", "destroy"]


async def test_sync_methods_run_in_a_worker_thread_without_blocking_the_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async with Dispatcher(manifest(recording())) as dispatcher:
        task = asyncio.create_task(ticker())
        thread_name = await dispatcher.call("rec", "blocking", {"seconds": 0.3})
        task.cancel()
    assert thread_name != threading.main_thread().name
    assert ticks >= 5  # the loop kept turning while the method slept


async def test_plugin_exceptions_become_plugin_errors_and_the_dispatcher_survives() -> None:
    async with Dispatcher(manifest(recording())) as dispatcher:
        with pytest.raises(PluginError) as caught:
            await dispatcher.call("rec", "broken")
        assert caught.value.remote_type == "TypeError"
        assert "plugin code has a bug" in caught.value.message
        assert await dispatcher.call("rec", "shout", {"text": "still here"}) == "STILL HERE"


async def test_params_that_do_not_bind_are_invalid_params() -> None:
    async with Dispatcher(manifest(recording())) as dispatcher:
        with pytest.raises(InvalidParams, match="text"):
            await dispatcher.call("rec", "shout", {"txt": "typo"})
        with pytest.raises(InvalidParams, match="JSON"):
            await dispatcher.call("rec", "shout", {"text": {1, 2}})
        with pytest.raises(MethodNotFound):
            await dispatcher.call("rec", "whisper")


async def test_an_async_method_past_its_deadline_is_cut_off() -> None:
    plugin = {
        "id": "echo",
        "version": "1.0.0",
        "target": {"provider": "local", "entrypoint": "echo_plugin:EchoPlugin"},
        "methods": {"sleep": {"timeout_ms": 100}},
    }
    async with Dispatcher(manifest(plugin)) as dispatcher:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await dispatcher.call("echo", "sleep", {"seconds": 5})
        assert time.monotonic() - started < 1.0


async def test_events_reach_host_handlers() -> None:
    seen: list[tuple[str, Any]] = []
    async_seen: list[str] = []

    async def async_handler(event: str, data: Any) -> None:
        async_seen.append(event)

    async with Dispatcher(manifest(recording())) as dispatcher:
        dispatcher.on("rec", "shouted", lambda event, data: seen.append((event, data)))
        dispatcher.on("rec", "*", async_handler)
        await dispatcher.call("rec", "shout", {"text": "hey"})
        await asyncio.sleep(0)
    assert seen == [("shouted", {"text": "hey"})]
    assert async_seen == ["shouted"]


async def test_a_plugin_that_fails_to_start_fails_the_dispatcher_cleanly() -> None:
    recording_plugin.EVENTS.clear()
    failing = {
        "id": "bad",
        "version": "1.0.0",
        "target": {"provider": "local", "entrypoint": "recording_plugin:FailingStartPlugin"},
        "methods": {"ping": {}},
    }
    with pytest.raises(ProviderError, match="cannot open the database"):
        async with Dispatcher(manifest(recording(), failing)):
            pass
    # the plugin that did start was stopped again
    assert recording_plugin.EVENTS[-2:] == ["stop", "destroy"]


async def test_an_unknown_entrypoint_is_a_clear_error() -> None:
    missing = {
        "id": "ghost",
        "version": "1.0.0",
        "target": {"provider": "local", "entrypoint": "no_such_module:Plugin"},
        "methods": {"boo": {}},
    }
    with pytest.raises(ProviderError, match="cannot load plugin 'no_such_module:Plugin'"):
        async with Dispatcher(manifest(missing)):
            pass


async def test_legacy_plugins_without_the_base_class_work() -> None:
    legacy = {
        "id": "legacy",
        "version": "0.9.0",
        "config": {"prefix": "hello"},
        "target": {"provider": "local", "entrypoint": "recording_plugin:LegacyPlugin"},
        "methods": {"greet": {}},
    }
    async with Dispatcher(manifest(legacy)) as dispatcher:
        assert await dispatcher.call("legacy", "greet", {"name": "ada"}) == "hello ada"
        assert await dispatcher.call("legacy", "greet", ["bob"]) == "hello bob"
        [report] = await dispatcher.health()
    assert report.health.ok


async def test_without_a_path_the_plugin_is_imported_from_the_manifest_s_folder(
    tmp_path: Path,
) -> None:
    (tmp_path / "beside_its_manifest.py").write_text(
        "class Beside:\n    def where(self) -> str:\n        return __file__\n"
    )
    (tmp_path / "plugins.yaml").write_text(
        "version: 1\n"
        "plugins:\n"
        "  - id: beside\n"
        "    version: 1.0.0\n"
        "    target: {provider: local, entrypoint: 'beside_its_manifest:Beside'}\n"
        "    methods: {where: {}}\n"
    )
    async with Dispatcher.from_file(tmp_path / "plugins.yaml") as dispatcher:
        assert await dispatcher.call("beside", "where") == str(tmp_path / "beside_its_manifest.py")


async def test_an_explicit_path_wins_over_the_manifest_s_folder(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for folder, answer in ((tmp_path, "manifest folder"), (elsewhere, "explicit path")):
        (folder / "which_folder_plugin.py").write_text(
            f"class Which:\n    def which(self) -> str:\n        return {answer!r}\n"
        )
    (tmp_path / "plugins.yaml").write_text(
        "version: 1\n"
        "plugins:\n"
        "  - id: which\n"
        "    version: 1.0.0\n"
        "    target: {provider: local, entrypoint: 'which_folder_plugin:Which', path: elsewhere}\n"
        "    methods: {which: {}}\n"
    )
    async with Dispatcher.from_file(tmp_path / "plugins.yaml") as dispatcher:
        assert await dispatcher.call("which", "which") == "explicit path"


def test_a_host_binds_only_the_methods_it_is_asked_for() -> None:
    class Wide:
        methods_seen = 0

        def listed(self) -> str:
            return "listed"

        def unlisted(self) -> str:
            return "unlisted"

        def start(self) -> None:  # a lifecycle hook stays a hook even when a manifest names it
            pass

        def _private(self) -> None:
            pass

    host = PluginHost(Wide(), methods=["listed", "start", "_private", "absent"])
    assert list(host.methods) == ["listed"]
    assert sorted(PluginHost(Wide()).methods) == ["listed", "unlisted"]


async def test_a_local_plugin_binds_only_the_methods_its_manifest_lists(tmp_path: Path) -> None:
    (tmp_path / "wide_plugin.py").write_text(
        "class Wide:\n"
        + "".join(
            f"    def m{index}(self) -> int:\n        return {index}\n" for index in range(50)
        )
    )
    (tmp_path / "plugins.yaml").write_text(
        "version: 1\n"
        "plugins:\n"
        "  - id: wide\n"
        "    version: 1.0.0\n"
        "    target: {provider: local, entrypoint: 'wide_plugin:Wide'}\n"
        "    methods: {m7: {}, missing: {}}\n"
    )
    async with Dispatcher.from_file(tmp_path / "plugins.yaml") as dispatcher:
        assert await dispatcher.call("wide", "m7") == 7
        # Listed in the manifest but not on the class: the plugin's own "no such method".
        with pytest.raises(MethodNotFound, match="it has: m7"):
            await dispatcher.call("wide", "missing")
        with pytest.raises(MethodNotFound):  # on the class, not in the manifest: no route
            await dispatcher.call("wide", "m8")


def _twin_folders(root: Path, module: str) -> tuple[Path, Path]:
    """Two folders, each with its own code under one entrypoint ``{module}:Twin``."""
    folders = []
    for name in ("a", "b"):
        folder = root / name
        folder.mkdir()
        (folder / f"{module}.py").write_text(
            f"class Twin:\n    def who(self) -> str:\n        return {name!r}\n"
        )
        folders.append(folder)
    return folders[0], folders[1]


def test_one_module_from_two_folders_is_refused_as_the_manifest_loads(tmp_path: Path) -> None:
    """Python holds one module of a name per process: a second folder's ``twin`` would
    be the first's, and its calls would run the first folder's code. A plugin with two
    local targets differing only in ``path``, or two versions of a rollout in two
    folders, is refused, naming both; one folder loads, and so do folders that do not
    hold the module (it is imported from ``sys.path`` then, whichever folder is named)."""
    module = f"twin_{tmp_path.name.replace('-', '_')}"
    first, second = _twin_folders(tmp_path, module)
    entrypoint = f"{module}:Twin"

    def local(folder: Path) -> dict[str, Any]:
        return {"provider": "local", "entrypoint": entrypoint, "path": str(folder)}

    with pytest.raises(ManifestError) as two_targets:
        manifest(
            {
                "id": "twin",
                "version": "1.0.0",
                "target": local(first),
                "methods": {"who": {}, "who_b": {"target": local(second)}},
            }
        )
    (problem,) = two_targets.value.problems
    assert problem.path == "plugins[0].methods.who_b.target.path"
    assert f"imports module {module!r} from {second / module}.py" in problem.message
    assert f"plugins[0].target imports it from {first / module}.py" in problem.message
    with pytest.raises(ManifestError, match=f"imports module {module!r}"):
        manifest(
            {"id": "twin", "version": "1.0.0", "target": local(first), "methods": {"who": {}}},
            {"id": "twin", "version": "2.0.0", "target": local(second), "methods": {"who": {}}},
        )
    manifest(  # one folder for both versions: one module, as written
        {"id": "twin", "version": "1.0.0", "target": local(first), "methods": {"who": {}}},
        {"id": "twin", "version": "2.0.0", "target": local(first), "methods": {"who": {}}},
    )
    (tmp_path / "empty").mkdir()
    manifest(
        {"id": "twin", "version": "1.0.0", "target": local(first), "methods": {"who": {}}},
        {
            "id": "twin",
            "version": "2.0.0",
            "target": local(tmp_path / "empty"),
            "methods": {"who": {}},
        },
    )


class Decorated:
    """Methods wrapped by decorators written without ``async``: to the SDK each is a
    plain function, run in a worker thread, whose return value is a coroutine."""

    @staticmethod
    def _logged(method: Any) -> Any:
        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            return method(self, *args, **kwargs)

        return wrapper

    @_logged
    async def greet(self, name: str) -> str:
        await asyncio.sleep(0)
        return f"hello {name}"

    @_logged
    async def fails(self) -> None:
        await asyncio.sleep(0)
        raise ValueError("the method's own")

    @_logged
    async def slow(self) -> str:
        await asyncio.sleep(5)
        return "late"


async def test_a_sync_wrapper_around_an_async_method_answers_the_method_s_result() -> None:
    """Before: provider_error 'not JSON: coroutine', and a RuntimeWarning that the
    coroutine was never awaited."""
    host = PluginHost(Decorated())
    assert await host.call("greet", {"name": "ada"}) == "hello ada"
    with pytest.raises(PluginError, match="the method's own") as failed:
        await host.call("fails", {})
    assert failed.value.remote_type == "ValueError"
    with pytest.raises(DeadlineExceeded):  # the coroutine runs on the loop: a deadline cuts it
        await host.call_with_deadline("slow", {}, {}, 0.05)
    with pytest.raises(InvalidParams):  # params that do not bind to the wrapper's signature
        await host.call("greet", {"nobody": 1})
