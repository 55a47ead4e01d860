"""What the host says of who a plugin is, against the built Go and Rust example plugins
run as subprocess plugins (``sdk/<lang>/dist/example-plugin``, which call themselves
``example`` version ``1.0.0``): a manifest naming them otherwise is warned of once at
attach, naming both; their ``method_not_found`` names the plugin by the manifest's id.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Dispatcher, MethodNotFound
from tests.conftest import manifest

ROOT = Path(__file__).resolve().parents[1]


def example(language: str) -> Path:
    binary = ROOT / "sdk" / language / "dist" / "example-plugin"
    if not binary.exists():
        pytest.skip(f"{binary} is not built (sdk/{language}/build.sh)")
    return binary


def renamed(binary: Path, **extra: Any) -> dict[str, Any]:
    return {
        "id": "gsub",
        "version": "2.0.0",
        "target": {"provider": "subprocess", "command": [str(binary)]},
        "methods": {"echo": {}, "nope": {}},
        **extra,
    }


@pytest.mark.parametrize("language", ["go", "rust"])
async def test_a_plugin_reporting_another_identity_is_warned_of_once_naming_both(
    language: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatcher.providers.grpc")
    # Once per plugin and reported identity in a process: an id of this test's own.
    plugin_id = f"{language}-told"
    async with Dispatcher(manifest(renamed(example(language), id=plugin_id))) as dispatcher:
        assert await dispatcher.call(plugin_id, "echo", {"a": 1}) == {"a": 1}
    told = [r.getMessage() for r in caplog.records if "reports itself as" in r.getMessage()]
    assert len(told) == 1, told
    assert "example version 1.0.0" in told[0] and f"{plugin_id} version 2.0.0" in told[0]


async def test_a_plugin_reporting_the_manifests_identity_is_not_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatcher.providers.grpc")
    same = renamed(example("go"), id="example", version="1.0.0")
    async with Dispatcher(manifest(same)) as dispatcher:
        assert await dispatcher.call("example", "echo", 1) == 1
    assert "reports itself as" not in caplog.text


@pytest.mark.parametrize("language", ["go", "rust"])
async def test_method_not_found_names_the_plugin_by_the_manifests_id(language: str) -> None:
    async with Dispatcher(manifest(renamed(example(language)))) as dispatcher:
        with pytest.raises(MethodNotFound) as missing:
            await dispatcher.call("gsub", "nope", {})
    error = missing.value
    assert error.message.startswith("plugin 'gsub' has no method 'nope'"), error.message
    assert "example" not in error.message
    assert "nope" in error.details["plugin_message"]  # the plugin's own words, kept
