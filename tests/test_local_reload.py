"""A reload that points a local plugin at a new folder runs the new folder's code.

Python keeps one module per name in a process (``sys.modules``): a new folder holding a
module of the name already imported from the old one would otherwise be ignored, the
reload reporting success while the old code kept answering. Real plugin files in
temporary folders, a real dispatcher; every test imports modules of a name of its own
and takes them out of ``sys.modules`` (and their folders out of ``sys.path``) after.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Dispatcher, MethodNotFound, ProviderError
from providers.local import ModuleConflict
from tests.conftest import manifest, route_warnings

# A plugin whose answer names its folder; ``slow`` answers after a nap, from the module's
# globals as they are when it answers.
MODULE = """
import asyncio

def answer() -> str:
    return {answer!r}

class Answer:
    def which(self) -> str:
        return answer()

    async def slow(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return answer()
"""

# The same plugin as a package: its answer lives in a submodule.
PACKAGE_INIT = ""
PACKAGE_SUB = "ANSWER = {answer!r}\n"
PACKAGE_PLUGIN = """
from . import sub

class Answer:
    def which(self) -> str:
        return sub.ANSWER
"""


@pytest.fixture
def module_name(tmp_path: Path) -> Iterator[str]:
    """A module name no other test imports; gone from ``sys.modules`` after the test."""
    name = f"answer_{tmp_path.name.replace('-', '_')}"
    path_before = list(sys.path)
    yield name
    for loaded in [key for key in sys.modules if key == name or key.startswith(f"{name}.")]:
        del sys.modules[loaded]
    sys.path[:] = path_before


def module_folder(root: Path, name: str, answer: str) -> Path:
    folder = root / answer
    folder.mkdir()
    (folder / f"{name}.py").write_text(MODULE.format(answer=answer))
    return folder


def package_folder(root: Path, name: str, answer: str) -> Path:
    folder = root / answer
    package = folder / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(PACKAGE_INIT)
    (package / "sub.py").write_text(PACKAGE_SUB.format(answer=answer))
    (package / "plugin.py").write_text(PACKAGE_PLUGIN)
    return folder


def entry(entrypoint: str, folder: Path, version: str = "1.0.0", **which: Any) -> dict[str, Any]:
    return {
        "id": "answer",
        "version": version,
        "target": {"provider": "local", "entrypoint": entrypoint, "path": str(folder)},
        "methods": {"which": which, "slow": {}},
    }


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"], ids=["same-version", "new-version"])
async def test_a_reload_to_a_new_folder_runs_the_new_folder_s_module(
    tmp_path: Path, module_name: str, version: str
) -> None:
    old = module_folder(tmp_path, module_name, "old")
    new = module_folder(tmp_path, module_name, "new")
    entrypoint = f"{module_name}:Answer"
    async with Dispatcher(manifest(entry(entrypoint, old))) as dispatcher:
        assert await dispatcher.call("answer", "which") == "old"
        await dispatcher.reload(manifest(entry(entrypoint, new, version)))
        assert await dispatcher.call("answer", "which") == "new"
        assert sys.modules[module_name].__file__ == str(new / f"{module_name}.py")


async def test_the_old_instance_runs_its_own_code_until_it_is_detached(
    tmp_path: Path, module_name: str
) -> None:
    """Both versions are attached at once during a reload (the new one before the old
    one is detached): a call in flight on the old one ends with the old code."""
    old = module_folder(tmp_path, module_name, "old")
    new = module_folder(tmp_path, module_name, "new")
    entrypoint = f"{module_name}:Answer"
    async with Dispatcher(manifest(entry(entrypoint, old))) as dispatcher:
        in_flight = asyncio.create_task(dispatcher.call("answer", "slow", {"seconds": 0.5}))
        await asyncio.sleep(0.1)
        await dispatcher.reload(manifest(entry(entrypoint, new, "2.0.0")), grace=10)
        assert await in_flight == "old"
        assert await dispatcher.call("answer", "slow", {"seconds": 0}) == "new"


async def test_a_package_and_its_submodules_come_from_the_new_folder(
    tmp_path: Path, module_name: str
) -> None:
    old = package_folder(tmp_path, module_name, "old")
    new = package_folder(tmp_path, module_name, "new")
    entrypoint = f"{module_name}.plugin:Answer"
    async with Dispatcher(manifest(entry(entrypoint, old))) as dispatcher:
        assert await dispatcher.call("answer", "which") == "old"
        await dispatcher.reload(manifest(entry(entrypoint, new)))
        assert await dispatcher.call("answer", "which") == "new"
        assert sys.modules[f"{module_name}.sub"].__file__ == str(new / module_name / "sub.py")
        # and back again: the first folder is on sys.path before the second by now
        await dispatcher.reload(manifest(entry(entrypoint, old, "3.0.0")))
        assert await dispatcher.call("answer", "which") == "old"


async def test_a_reload_on_the_same_path_keeps_the_loaded_module(
    tmp_path: Path, module_name: str
) -> None:
    """Code edited in place is not re-imported by a reload: a restart, or a new folder,
    loads it (README, "Local plugins and their folders")."""
    folder = module_folder(tmp_path, module_name, "old")
    entrypoint = f"{module_name}:Answer"
    async with Dispatcher(manifest(entry(entrypoint, folder))) as dispatcher:
        loaded = sys.modules[module_name]
        (folder / f"{module_name}.py").write_text(MODULE.format(answer="edited"))
        summary = await dispatcher.reload(manifest(entry(entrypoint, folder, timeout_ms=5000)))
        assert summary["changed"] == ["answer@1.0.0"]
        assert await dispatcher.call("answer", "which") == "old"
        await dispatcher.reload(manifest(entry(entrypoint, folder, "2.0.0")))
        assert await dispatcher.call("answer", "which") == "old"
        assert sys.modules[module_name] is loaded


async def test_a_module_the_host_imported_itself_is_not_replaced(
    tmp_path: Path, module_name: str
) -> None:
    """A module the application imported before any plugin did is the application's:
    replacing it would leave the application holding one version and the plugin another,
    so the reload fails, naming the module and both folders, and the old one runs on."""
    old = module_folder(tmp_path, module_name, "old")
    new = module_folder(tmp_path, module_name, "new")
    entrypoint = f"{module_name}:Answer"
    sys.path.insert(0, str(old))
    importlib.import_module(module_name)
    async with Dispatcher(manifest(entry(entrypoint, old))) as dispatcher:
        running = dispatcher.manifest
        with pytest.raises(ModuleConflict) as refused:
            await dispatcher.reload(manifest(entry(entrypoint, new, "2.0.0")))
        message = str(refused.value)
        assert repr(module_name) in message
        assert str(old / f"{module_name}.py") in message
        assert str(new / f"{module_name}.py") in message
        assert isinstance(refused.value, ProviderError)
        assert dispatcher.manifest is running
        assert await dispatcher.call("answer", "which") == "old"


async def test_a_new_folder_that_fails_to_import_leaves_the_old_module_in_place(
    tmp_path: Path, module_name: str
) -> None:
    old = module_folder(tmp_path, module_name, "old")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / f"{module_name}.py").write_text("raise RuntimeError('not this one')\n")
    entrypoint = f"{module_name}:Answer"
    async with Dispatcher(manifest(entry(entrypoint, old))) as dispatcher:
        loaded = sys.modules[module_name]
        with pytest.raises(ProviderError, match="not this one"):
            await dispatcher.reload(manifest(entry(entrypoint, broken, "2.0.0")))
        assert sys.modules[module_name] is loaded
        assert await dispatcher.call("answer", "which") == "old"
        await dispatcher.reload(manifest(entry(entrypoint, old, "2.0.0")))
        assert await dispatcher.call("answer", "which") == "old"


async def test_a_reload_that_fails_after_a_module_was_swapped_puts_it_back(
    tmp_path: Path, module_name: str
) -> None:
    """The new version attached, swapping in the new folder's module; another plugin of
    the same reload failed, so the reload detached the new version again: the running
    version's module is the one in ``sys.modules`` again, as after a failed import."""
    old = module_folder(tmp_path, module_name, "old")
    new = module_folder(tmp_path, module_name, "new")
    entrypoint = f"{module_name}:Answer"
    failing = {
        "id": "failing",
        "version": "1.0.0",
        "target": {
            "provider": "local",
            "entrypoint": f"{module_name}:NoSuchClass",
            "path": str(new),
        },
        "methods": {"which": {}},
    }
    async with Dispatcher(manifest(entry(entrypoint, old))) as dispatcher:
        loaded = sys.modules[module_name]
        with pytest.raises(ProviderError, match="NoSuchClass"):
            await dispatcher.reload(manifest(entry(entrypoint, new, "2.0.0"), failing))
        # Before: the new folder's module stayed, so the next import of the name by the
        # running version (or a reload keeping the old path) got the new folder's code.
        assert sys.modules[module_name] is loaded
        assert await dispatcher.call("answer", "which") == "old"


# A plugin with more methods than its first entry lists; it counts its inits and starts.
COUNTING = """
STARTED = []

class Counting:
    def init(self, config: dict) -> None:
        STARTED.append("init")

    def start(self) -> None:
        STARTED.append("start")

    def which(self) -> str:
        return "which"

    def extra(self) -> str:
        return "extra"

    async def chunks(self, count: int):
        for index in range(count):
            yield index
"""


def counting_entry(folder: Path, entrypoint: str, *methods: str) -> dict[str, Any]:
    return {
        "id": "counting",
        "version": "1.0.0",
        "target": {"provider": "local", "entrypoint": entrypoint, "path": str(folder)},
        "methods": {name: {} for name in methods},
    }


async def test_a_reload_that_changes_the_methods_on_the_same_target_rebinds_them(
    tmp_path: Path, module_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload adds and removes methods of a running version and leaves its target
    equal: the version is not attached again (the same instance, init and start run
    once), and its methods are those of the new entry. Before: the instance kept the
    methods its attach bound, so a method the reload added failed MethodNotFound though
    the class has it, and one the class lacks was never said."""
    caplog.set_level(logging.WARNING, logger="dispatcher")
    (tmp_path / f"{module_name}.py").write_text(COUNTING)
    entrypoint = f"{module_name}:Counting"
    async with Dispatcher(manifest(counting_entry(tmp_path, entrypoint, "which"))) as dispatcher:
        provider = dispatcher.providers["local"]
        (host,) = provider._hosts.values()
        summary = await dispatcher.reload(
            manifest(counting_entry(tmp_path, entrypoint, "which", "extra", "chunks"))
        )
        assert summary["changed"] == ["counting@1.0.0"]
        assert await dispatcher.call("counting", "extra") == "extra"
        assert await dispatcher.call("counting", "chunks", {"count": 2}) == [0, 1]
        assert [chunk async for chunk in dispatcher.stream("counting", "chunks", {"count": 3})] == [
            0,
            1,
            2,
        ]
        assert route_warnings(caplog) == []

        # A method the class lacks: said as at a start, and named by health.
        await dispatcher.reload(manifest(counting_entry(tmp_path, entrypoint, "which", "absent")))
        (warning,) = route_warnings(caplog)
        assert warning.startswith(
            f"counting@1.0.0: the manifest routes absent to local {entrypoint}"
        )
        assert warning.endswith("it serves: chunks, extra, which")
        (report,) = await dispatcher.health()
        assert report.missing_methods == ("absent",)
        with pytest.raises(MethodNotFound):
            await dispatcher.call("counting", "absent")
        with pytest.raises(MethodNotFound):  # removed by this reload
            await dispatcher.call("counting", "extra")
        assert await dispatcher.call("counting", "which") == "which"

        # Removed from the entry: no longer served by the plugin either.
        await dispatcher.reload(manifest(counting_entry(tmp_path, entrypoint, "which")))
        (report,) = await dispatcher.health()
        assert report.missing_methods == ()
        assert sorted(host.methods) == ["which"]
        assert list(provider._hosts.values()) == [host]  # never attached again
        assert sys.modules[module_name].STARTED == ["init", "start"]
    assert len(route_warnings(caplog)) == 1
