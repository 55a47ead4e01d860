"""Version ranges (npm semantics) and plugin protocol versions refused at attach."""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest

from dispatcher import Dispatcher
from dispatcher._routes import RouteTable
from linchkit_plugin.errors import InvalidParams, PluginNotFound, ProviderError
from tests.conftest import LOCAL_TARGET, ROOT, echo_plugin, manifest

SOURCE_PATH = ":".join([str(ROOT), str(ROOT / "sdk" / "python")])


def versions(*numbers: str) -> list[dict[str, Any]]:
    return [
        echo_plugin("echo", LOCAL_TARGET, version=number, config={"greeting": number})
        for number in numbers
    ]


async def greeting(dispatcher: Dispatcher, version: str | None) -> str:
    result = await dispatcher.call("echo", "say", {"text": "x"}, version=version)
    return str(result["greeting"])


async def test_a_range_goes_to_the_highest_version_in_it() -> None:
    plugins = versions("1.2.0", "1.2.7", "1.3.1", "1.10.0-rc.1", "2.0.0", "0.3.4", "0.4.0")
    async with Dispatcher(manifest(*plugins)) as dispatcher:
        cases = {
            "^1.2": "1.3.1",  # caret: same major; a pre-release is never picked by it
            "~1.2.0": "1.2.7",  # tilde: same minor
            "1.2.x": "1.2.7",
            "1.x": "1.3.1",
            "*": "2.0.0",
            ">=1.2.1 <1.3.0": "1.2.7",
            "^0.3": "0.3.4",  # caret below 1.0: the minor is the breaking part
            "1.2.0": "1.2.0",  # exact versions keep working
            "1.10.0-rc.1": "1.10.0-rc.1",
            ">=1.10.0-rc.0 <2": "1.10.0-rc.1",  # a range naming a pre-release admits it
        }
        for wanted, expected in cases.items():
            assert await greeting(dispatcher, wanted) == expected, wanted
        assert await greeting(dispatcher, None) == "2.0.0"


async def test_a_range_nobody_satisfies_names_the_versions_that_exist() -> None:
    async with Dispatcher(manifest(*versions("1.2.0", "1.3.1"))) as dispatcher:
        with pytest.raises(PluginNotFound, match=r"satisfies '\^2'; it has: 1\.2\.0, 1\.3\.1"):
            await greeting(dispatcher, "^2")
        with pytest.raises(PluginNotFound) as missing:
            await greeting(dispatcher, "1.2.5")
        assert missing.value.details["versions"] == ["1.2.0", "1.3.1"]
        with pytest.raises(PluginNotFound, match="no plugin 'other@"):
            await dispatcher.call("other", "say", version="^1")


async def test_a_hostile_range_is_refused_as_invalid_params() -> None:
    async with Dispatcher(manifest(*versions("1.2.0"))) as dispatcher:
        for hostile in ("not a range", "^^1", "1.2.3.4.5", "^" + "1" * 300, "\x00", ">= <"):
            with pytest.raises(InvalidParams):
                await greeting(dispatcher, hostile)


def test_ranges_are_resolved_once_per_table_and_the_memory_is_bounded() -> None:
    table = RouteTable()
    with pytest.raises(PluginNotFound):
        table.find("echo", "say", "^1", "running")
    # Thousands of distinct ranges from callers: the memory never passes its bound.
    table._versions[("echo", "1.2.0")] = {"say": object()}  # type: ignore[dict-item]
    for minor in range(3 * RouteTable.MAX_RANGES):
        table.find("echo", "say", f">=1.0.0 <1.{minor + 3}.0", "running")
    assert len(table._ranges) <= RouteTable.MAX_RANGES


async def test_exact_versions_cost_no_more_with_ranges_in_use() -> None:
    async with Dispatcher(manifest(*versions("1.2.0", "1.3.1"))) as dispatcher:
        routes = dispatcher._routes
        routes.find("echo", "say", "^1.2", "running")

        def per_lookup(version: str | None) -> float:
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(20_000):
                    routes.find("echo", "say", version, "running")
                best = min(best, (time.perf_counter() - started) / 20_000)
            return best

        exact, cached_range = per_lookup("1.2.0"), per_lookup("^1.2")
        # A remembered range is two lookups; parsing it every time would be ~50x more.
        assert cached_range < 5 * exact + 2e-6, (exact, cached_range)


async def test_a_plugin_declaring_a_protocol_the_dispatcher_does_not_speak_is_refused() -> None:
    entry = echo_plugin("echo", LOCAL_TARGET, protocol=2)
    with pytest.raises(ProviderError, match=r"echo@1\.0\.0 speaks plugin protocol 2; .* speaks 1"):
        async with Dispatcher(manifest(entry)):
            pass


def protocol_plugin(spoken: int, declared: int) -> dict[str, Any]:
    """A real subprocess plugin built for protocol ``spoken`` (what its Describe reports)."""
    program = (
        "import sys, linchkit_plugin.grpc_server as server\n"
        f"server.PROTOCOL_VERSION = {spoken}\n"
        "from crashing_plugin import CrashingPlugin\n"
        "sys.exit(server.main(CrashingPlugin, plugin_id='crashing', version='1.0.0'))\n"
    )
    return {
        "id": "crashing",
        "version": "1.0.0",
        "protocol": declared,
        "target": {
            "provider": "subprocess",
            "command": [sys.executable, "-c", program],
            "protocol_versions": [spoken],
            "env": {"PYTHONPATH": f"{SOURCE_PATH}:{ROOT / 'tests' / 'plugins'}"},
        },
        "methods": {"pid": {}, "echo": {}},
    }


async def test_a_transport_reporting_its_declared_protocol_attaches() -> None:
    async with Dispatcher(manifest(protocol_plugin(1, 1))) as dispatcher:
        assert await dispatcher.call("crashing", "echo", {"value": 7}) == 7


async def test_a_transport_reporting_another_protocol_than_declared_is_refused() -> None:
    with pytest.raises(ProviderError, match="speaks plugin protocol 2, but the manifest declares"):
        async with Dispatcher(manifest(protocol_plugin(2, 1))):
            pass
