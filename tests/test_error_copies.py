"""Copies of errors: one failure handed to several callers (a batch, the followers of a
cache miss) is a clone each, and every error class can be cloned and pickled, whatever
its constructor takes (``linchkit_plugin.errors.DispatchError.__reduce__``)."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Dispatcher, parse_manifest
from linchkit_plugin.errors import DispatchError, PluginError
from providers._local_imports import ModuleConflict
from providers.capabilities import LimitExceeded
from providers.wasm.http_host import NetworkRefused

ERRORS = [
    LimitExceeded("over cpu_s", limit="cpu_s", value=2.0),
    ModuleConflict("echo", "/srv/app/echo.py", "/plugins/echo"),
    PluginError("boom", remote_type="KeyError", details={"key": "x"}),
    NetworkRefused("refused", details={"host": "example.com"}),
]


def _fields(error: DispatchError) -> dict[str, Any]:
    return {"class": type(error), "args": error.args, **vars(error)}


@pytest.mark.parametrize("error", ERRORS, ids=lambda error: type(error).__name__)
def test_every_error_is_cloned_and_pickled_with_its_fields(error: DispatchError) -> None:
    # Before: copy.copy rebuilt an error by calling its class with the message alone, and
    # LimitExceeded (keywords) and ModuleConflict (three names) raised TypeError.
    twin = error.clone()
    assert twin is not error and _fields(twin) == _fields(error)
    assert twin.details is not error.details
    assert _fields(pickle.loads(pickle.dumps(error))) == _fields(error)
    said = error.with_message("said again").with_details(more=1).with_retry_after(3.0)
    assert (type(said), said.message, said.args) == (type(error), "said again", ("said again",))
    assert said.details == {**error.details, "more": 1} and said.retry_after == 3.0
    assert error.message != "said again" and "more" not in error.details


_LIMITED_PLUGIN = """
import asyncio

from linchkit_plugin import Plugin
from providers.capabilities import LimitExceeded


class Limited(Plugin):
    async def spin(self, n):
        await asyncio.sleep(0.2)
        raise LimitExceeded("spun past cpu_s", limit="cpu_s", value=1.0)
"""


async def test_callers_sharing_a_cache_miss_each_get_the_limit_error(tmp_path: Path) -> None:
    # Followers of a cache miss get a clone of the leader's error: before, a clone of a
    # LimitExceeded raised TypeError in each follower instead.
    (tmp_path / "limited_plugin.py").write_text(_LIMITED_PLUGIN)
    target = {"provider": "local", "entrypoint": "limited_plugin:Limited", "path": str(tmp_path)}
    method = {"pure": True, "cache": {"ttl_ms": 60_000}}
    document = {
        "plugins": [{"id": "p", "version": "1.0.0", "target": target, "methods": {"spin": method}}]
    }
    async with Dispatcher(parse_manifest(document)) as dispatcher:
        outcomes = await asyncio.gather(
            *(dispatcher.call("p", "spin", {"n": 1}) for _ in range(3)), return_exceptions=True
        )
        assert dispatcher.stats()["caches"]["p@1.0.0.spin"]["coalesced"] == 2
    assert [type(outcome) for outcome in outcomes] == [LimitExceeded] * 3, outcomes
    assert all(outcome.details["limit"] == "cpu_s" for outcome in outcomes)  # type: ignore[union-attr]
