"""Streams and host events of an in-process (``local``) plugin behave as they do when the
same plugin runs as a child process (``subprocess``, the SDK's gRPC server): each test
runs on both, against one plugin (``tests/plugins/streaming_plugin.py``).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher import (
    DeadlineExceeded,
    Dispatcher,
    InvalidParams,
    Overloaded,
    PluginError,
    RateLimited,
    TargetUnavailable,
    parse_manifest,
)
from linchkit_plugin import current_context
from linchkit_plugin.host import PluginHost
from tests.conftest import ROOT, manifest

PLUGIN = ROOT / "tests" / "plugins" / "streaming_plugin.py"
SOURCE_PATH = os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python")])
TARGETS = {
    "local": {"provider": "local", "entrypoint": "streaming_plugin:StreamingPlugin"},
    "subprocess": {
        "provider": "subprocess",
        "command": [sys.executable, str(PLUGIN)],
        "env": {"PYTHONPATH": SOURCE_PATH},
        "events": True,
    },
}


@pytest.fixture(params=sorted(TARGETS))
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def streams(provider: str, marks: Path, **policies: Any) -> dict[str, Any]:
    return {
        "id": "streams",
        "version": "1.0.0",
        "config": {"marks": str(marks)},
        "target": TARGETS[provider],
        "defaults": policies,
        "methods": {"count": {}, "count_fail": {}, "trickle": {}, "double": {}},
    }


async def until_marked(marks: Path, *names: str, within: float = 5.0) -> str:
    """The first of ``names`` the plugin notes in ``marks``, waiting ``within`` seconds."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        for name in names:
            if (marks / name).exists():
                return name
        await asyncio.sleep(0.02)
    raise AssertionError(f"the plugin noted none of {names}: {sorted(os.listdir(marks))}")


async def collect(chunks: AsyncIterator[Any], into: list[Any] | None = None) -> list[Any]:
    """The chunks of a stream; with ``into``, kept there as they come (before an error)."""
    got = [] if into is None else into
    async for chunk in chunks:
        got.append(chunk)
    return got


async def test_a_streaming_method_streams_and_a_call_of_it_answers_the_list(
    provider: str, tmp_path: Path
) -> None:
    async with Dispatcher(manifest(streams(provider, tmp_path))) as dispatcher:
        assert await collect(dispatcher.stream("streams", "count", {"n": 3})) == [
            {"i": 0},
            {"i": 1},
            {"i": 2},
        ]
        assert await dispatcher.call("streams", "count", {"n": 2}) == [{"i": 0}, {"i": 1}]
        # A stream of a unary method yields its one result.
        assert await collect(dispatcher.stream("streams", "double", {"x": 4})) == [8]


async def test_a_plugin_error_mid_stream_comes_after_the_chunks_before_it(
    provider: str, tmp_path: Path
) -> None:
    got: list[Any] = []
    async with Dispatcher(manifest(streams(provider, tmp_path))) as dispatcher:
        with pytest.raises(PluginError) as caught:
            await collect(dispatcher.stream("streams", "count_fail", {"n": 2}), got)
        assert got == [{"i": 0}, {"i": 1}]
        assert caught.value.remote_type == "StreamBroke"
        assert "stream broke" in caught.value.message
        with pytest.raises(InvalidParams, match="'n'"):
            await collect(dispatcher.stream("streams", "count", {"m": 2}))


async def test_a_stream_past_its_deadline_is_cut_off_and_its_generator_cancelled(
    provider: str, tmp_path: Path
) -> None:
    got: list[Any] = []
    async with Dispatcher(manifest(streams(provider, tmp_path))) as dispatcher:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await collect(
                dispatcher.stream("streams", "trickle", {"tag": "late"}, timeout=0.4), got
            )
        assert time.monotonic() - started < 2.0
        assert got[:2] == [0, 1]
        await until_marked(tmp_path, "cancelled-late", "closed-late")


async def test_a_caller_that_stops_reading_or_is_cancelled_ends_the_generator(
    provider: str, tmp_path: Path
) -> None:
    async with Dispatcher(manifest(streams(provider, tmp_path))) as dispatcher:
        chunks = dispatcher.stream("streams", "trickle", {"tag": "left"})
        assert await anext(chunks) == 0
        await chunks.aclose()  # type: ignore[attr-defined]
        await until_marked(tmp_path, "cancelled-left", "closed-left")

        async def read() -> None:
            async for _ in dispatcher.stream("streams", "trickle", {"tag": "gone"}):
                pass

        reader = asyncio.create_task(read())
        await until_marked(tmp_path, "start-gone")
        await asyncio.sleep(0.1)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await until_marked(tmp_path, "cancelled-gone", "closed-gone")


async def test_a_stream_holds_its_method_s_bulkhead_slot_until_it_ends(
    provider: str, tmp_path: Path
) -> None:
    bulkhead = {"max_in_flight": 1, "max_waiting": 0}
    async with Dispatcher(manifest(streams(provider, tmp_path, concurrency=bulkhead))) as d:
        first = d.stream("streams", "count", {"n": 2})
        assert await anext(first) == {"i": 0}
        with pytest.raises(Overloaded):
            await anext(d.stream("streams", "count", {"n": 1}))
        assert await collect(first) == [{"i": 1}]
        assert await collect(d.stream("streams", "count", {"n": 1})) == [{"i": 0}]


async def test_a_stream_takes_one_unit_of_its_method_s_rate_limit(
    provider: str, tmp_path: Path
) -> None:
    limit = {"rate": 0.5, "burst": 1, "mode": "reject"}
    async with Dispatcher(manifest(streams(provider, tmp_path, rate_limit=limit))) as d:
        assert await collect(d.stream("streams", "count", {"n": 2})) == [{"i": 0}, {"i": 1}]
        with pytest.raises(RateLimited):
            await collect(d.stream("streams", "count", {"n": 1}))


async def test_a_host_event_reaches_the_plugin_and_its_answer_comes_back(
    provider: str, tmp_path: Path
) -> None:
    async with Dispatcher(manifest(streams(provider, tmp_path))) as dispatcher:
        answers: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        dispatcher.on("streams", "pong", lambda event, data: answers.put_nowait((event, data)))
        await dispatcher.publish("streams", "bad", {"x": 0})  # its handler fails: logged
        await dispatcher.publish("streams", "ping", {"x": 1})
        await dispatcher.publish("streams", "ping", {"x": 2})
        assert await asyncio.wait_for(answers.get(), 5) == ("pong", {"x": 1})
        assert await asyncio.wait_for(answers.get(), 5) == ("pong", {"x": 2})


class Legacy:
    """A plugin of the older local system: no SDK base class, no ``emit``."""

    async def init(self, config: dict[str, Any]) -> None:
        self.seen: list[Any] = []

    async def letters(self, word: str) -> AsyncIterator[str]:
        for letter in word:
            yield letter

    async def shout(self, text: str) -> str:
        return text.upper()

    async def on_event(self, event: str, data: Any) -> None:
        self.seen.append([event, data])

    async def seen_events(self) -> list[Any]:
        return self.seen


class Bare:
    async def shout(self, text: str) -> str:
        return text.upper()


async def test_a_plain_class_streams_and_takes_events_when_it_has_their_shapes() -> None:
    def entry(plugin_id: str, cls: str, methods: list[str]) -> dict[str, Any]:
        return {
            "id": plugin_id,
            "version": "1.0.0",
            "target": {"provider": "local", "entrypoint": f"tests.test_local_streams:{cls}"},
            "methods": {name: {} for name in methods},
        }

    plugins = manifest(
        entry("legacy", "Legacy", ["letters", "shout", "seen_events"]),
        entry("bare", "Bare", ["shout"]),
    )
    async with Dispatcher(plugins) as dispatcher:
        assert await collect(dispatcher.stream("legacy", "letters", {"word": "ab"})) == ["a", "b"]
        assert await dispatcher.call("legacy", "shout", {"text": "hi"}) == "HI"
        await dispatcher.publish("legacy", "ping", [1])
        for _ in range(100):
            if await dispatcher.call("legacy", "seen_events"):
                break
            await asyncio.sleep(0.01)
        assert await dispatcher.call("legacy", "seen_events") == [["ping", [1]]]
        # No on_event: the event is dropped, as the SDK's servers drop it.
        await dispatcher.publish("bare", "ping", None)
        assert await collect(dispatcher.stream("bare", "shout", {"text": "x"})) == ["X"]


class Contextual:
    def __init__(self) -> None:
        self.at_close: dict[str, Any] | None = None

    async def ids(self) -> AsyncIterator[Any]:
        try:
            while True:
                yield current_context().get("request_id")
        finally:
            self.at_close = dict(current_context())


async def test_a_stream_s_call_context_is_the_plugin_s_alone_and_it_closes_from_anywhere() -> None:
    plugin = Contextual()
    chunks = PluginHost(plugin).stream("ids", None, {"request_id": "r1"})
    assert await anext(chunks) == "r1"
    assert current_context() == {}  # the host's code between chunks does not see it
    assert await anext(chunks) == "r1"
    # Closed from another context (a task of its own, the collector's finalizer).
    await asyncio.create_task(chunks.aclose())
    assert plugin.at_close == {"request_id": "r1"}


async def test_an_event_goes_only_to_the_plugin_it_is_published_to(tmp_path: Path) -> None:
    def entry(plugin_id: str) -> dict[str, Any]:
        (tmp_path / plugin_id).mkdir()
        return {
            "id": plugin_id,
            "version": "1.0.0",
            "target": {
                "provider": "local",
                "entrypoint": "tests.test_local_streams:Legacy",
                "path": str(tmp_path / plugin_id),
            },
            "methods": {"seen_events": {}},
        }

    async with Dispatcher(manifest(entry("a"), entry("b"))) as dispatcher:
        await dispatcher.publish("a", "ping", 1)
        for _ in range(100):
            if await dispatcher.call("a", "seen_events"):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert await dispatcher.call("a", "seen_events") == [["ping", 1]]
        assert await dispatcher.call("b", "seen_events") == []


class Slow:
    """Takes host events only once told to (``go``): a host publishing meanwhile floods it."""

    async def init(self, config: dict[str, Any]) -> None:
        self.seen: list[int] = []
        self.open = asyncio.Event()

    async def on_event(self, event: str, data: Any) -> None:
        await self.open.wait()
        self.seen.append(data)

    async def go(self) -> None:
        self.open.set()

    async def seen_events(self) -> list[int]:
        return self.seen


async def test_a_flood_of_host_events_holds_the_newest_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A host publishing faster than ``on_event`` takes events grew its queue without
    bound; at most ``HOST_EVENTS_HELD`` wait, past that the oldest goes, said once."""
    from providers.host_events import HOST_EVENTS_HELD

    entry = {
        "id": "slow",
        "version": "1.0.0",
        "target": {"provider": "local", "entrypoint": "tests.test_local_streams:Slow"},
        "methods": {"go": {}, "seen_events": {}},
    }
    published = HOST_EVENTS_HELD * 5
    async with Dispatcher(manifest(entry)) as dispatcher:
        for number in range(published):
            await dispatcher.publish("slow", "tick", number)
        await dispatcher.call("slow", "go")
        seen: list[int] = []
        for _ in range(500):
            seen = await dispatcher.call("slow", "seen_events")
            if seen and seen[-1] == published - 1:
                break
            await asyncio.sleep(0.01)
    # The newest that were kept, in order; before them at most the one the handler
    # already held when the flood began.
    assert seen[-HOST_EVENTS_HELD:] == list(range(published - HOST_EVENTS_HELD, published))
    assert len(seen) <= HOST_EVENTS_HELD + 1
    drops = [r.getMessage() for r in caplog.records if "dropping the oldest" in r.getMessage()]
    assert len(drops) == 1 and "slow@1.0.0" in drops[0]


async def test_plugins_started_from_one_target_each_take_only_their_own_host_events(
    provider: str, tmp_path: Path
) -> None:
    """Two plugins started from one command (``subprocess``) or one class (``local``), and
    two versions of one of them during a rollout, all on an equal target: a host event
    reaches the plugin version it is published to and no other. The provider was told
    only the target, and sent to every plugin running on an equal one."""
    entry = streams(provider, tmp_path)
    plugins = [
        {**entry, "id": "a", "version": "1.0.0"},
        {**entry, "id": "a", "version": "2.0.0"},
        {**entry, "id": "b", "version": "1.0.0"},
    ]
    rollout = {"plugin": "a", "method": "double", "from": "1.0.0", "to": "2.0.0"}
    parsed = parse_manifest(
        {"version": 1, "plugins": plugins, "rollouts": [rollout]}, base_dir=ROOT
    )
    answers: list[tuple[str, str, Any]] = []
    async with Dispatcher(parsed) as dispatcher:
        dispatcher.on_event(
            lambda plugin, version, event, data: answers.append((plugin, version, data))
        )
        sent = {("a", "1.0.0"): "to a 1", ("a", "2.0.0"): "to a 2", ("b", "1.0.0"): "to b"}
        for (plugin, version), data in sent.items():
            await dispatcher.publish(plugin, "ping", data, version=version)
        # Then one last event each: a plugin answers in order, so once each has answered
        # its last, everything it was going to answer has come.
        for plugin, version in sent:
            await dispatcher.publish(plugin, "ping", "last", version=version)
        end = time.monotonic() + 10
        while {(p, v) for p, v, data in answers if data == "last"} != set(sent):
            assert time.monotonic() < end, answers
            await asyncio.sleep(0.02)
    assert sorted(answers) == sorted(
        [(plugin, version, data) for (plugin, version), data in sent.items()]
        + [(plugin, version, "last") for plugin, version in sent]
    )


async def test_a_host_event_for_a_plugin_not_running_on_the_target_is_refused(
    provider: str, tmp_path: Path
) -> None:
    """Another plugin runs on an equal target: that is no delivery to this one."""
    running = streams(provider, tmp_path)
    (absent,) = manifest({**running, "id": "absent"}).plugins
    async with Dispatcher(manifest(running)) as dispatcher:
        (target,) = dispatcher.manifest.plugins[0].targets()
        with pytest.raises(TargetUnavailable, match=r"absent@1\.0\.0 is not started"):
            await dispatcher.providers[provider].send_event(absent, target, "ping", 1)
