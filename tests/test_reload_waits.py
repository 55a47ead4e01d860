"""Which calls in flight a reload waits for before it detaches what it retired: those that may
reach a version it removed, or changed so that something of it ends (a target, a method),
not a long call or an open stream to a plugin it keeps, nor a call to a version whose change
ends nothing (a timeout). (Before, every call and stream in flight at the swap held the
detaching up, to the reload's grace: one subscription open for hours made every reload take
its grace and warn that calls still ran.)"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from dispatcher import Credentials, Dispatcher, parse_manifest
from linchkit_plugin.errors import ShuttingDown
from tests.conftest import ROOT, manifest
from tests.identity_support import jwks, jwt_config, rsa_key
from tests.services import until

PLUGIN = '''
import asyncio

#: Set by the test: the dispatcher a relay calls through.
DISPATCHER = None
#: How each nap ended, ``(tag, "whole")`` or ``(tag, "cut")``: cut when its plugin was
#: stopped (detached) while it still ran, as a process would have been.
ENDS = []


class Waits:
    async def init(self, config):
        self.config = config
        self.stopped = False

    async def stop(self):
        self.stopped = True

    async def nap(self, seconds):
        await asyncio.sleep(seconds + self.config.get("slower_by", 0))
        ENDS.append((self.config.get("tag"), "cut" if self.stopped else "whole"))
        if self.stopped:
            raise RuntimeError("stopped while a call still ran")
        return seconds

    async def ticks(self, count, every):
        for tick in range(count):
            await asyncio.sleep(every)
            yield tick

    async def relay(self, seconds):
        """A call of another plugin from inside this one's call."""
        return await DISPATCHER.call("removed", "nap", {"seconds": seconds})


class Elsewhere(Waits):
    """The same plugin at another entrypoint: another target for one version."""
'''

#: Long enough that a reload waiting for it is told apart from one that does not.
LONG = 3.0
#: A reload that waits for nothing ends well within this, on a busy machine too.
PROMPT = 1.5


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "waits_plugin.py").write_text(PLUGIN)
    return tmp_path


def plugin(folder: Path, plugin_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": plugin_id,
        "version": "1.0.0",
        "target": {"provider": "local", "entrypoint": "waits_plugin:Waits", "path": str(folder)},
        "methods": {"nap": {}, "ticks": {}, "relay": {}},
        **extra,
    }


async def reload_time(dispatcher: Dispatcher, *plugins: dict[str, Any]) -> float:
    started = time.monotonic()
    await dispatcher.reload(manifest(*plugins), grace=10)
    return time.monotonic() - started


async def test_a_long_call_to_a_kept_plugin_does_not_hold_up_a_reload(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kept, removed = plugin(folder, "kept"), plugin(folder, "removed")
    async with Dispatcher(manifest(kept, removed)) as dispatcher:
        napping = asyncio.create_task(dispatcher.call("kept", "nap", {"seconds": LONG}))
        await asyncio.sleep(0.2)
        with caplog.at_level(logging.WARNING, logger="dispatcher"):
            took = await reload_time(dispatcher, kept)
        assert took < PROMPT, f"the reload waited {took:.1f} s for a call to a kept plugin"
        assert "still ran" not in caplog.text
        assert await napping == LONG  # and the call was not disturbed


async def test_an_open_stream_to_a_kept_plugin_does_not_hold_up_a_reload(folder: Path) -> None:
    kept, removed = plugin(folder, "kept"), plugin(folder, "removed")
    async with Dispatcher(manifest(kept, removed)) as dispatcher:
        stream = dispatcher.stream("kept", "ticks", {"count": 30, "every": 0.1})
        ticks: list[int] = []
        first = asyncio.Event()

        async def read() -> None:
            async for tick in stream:
                ticks.append(tick)
                first.set()

        reading = asyncio.create_task(read())
        async with asyncio.timeout(10):
            await first.wait()
        took = await reload_time(dispatcher, kept)
        assert took < PROMPT, f"the reload waited {took:.1f} s for a stream to a kept plugin"
        await reading
        assert ticks == list(range(30))


@pytest.mark.parametrize("fallback", [False, True], ids=["plain", "with-a-fallback"])
async def test_a_reload_that_changes_only_a_timeout_does_not_wait_for_the_calls(
    folder: Path, caplog: pytest.LogCaptureFixture, fallback: bool
) -> None:
    # The version is changed, its targets and methods the same: its end detaches nothing,
    # closes no connection and forgets no state, so nothing waits for its calls, nor for
    # a call with a fallback (which may reach any version: none is ended). Before, the
    # reload waited for the call, LONG.
    svc, other = plugin(folder, "svc"), plugin(folder, "other")
    svc["methods"]["nap"] = {"timeout_ms": 30_000}
    if fallback:
        svc["methods"]["nap"]["fallback"] = {"plugin": "other", "on": ["target_unavailable"]}
    longer = {**svc, "methods": {**svc["methods"], "nap": {**svc["methods"]["nap"]}}}
    longer["methods"]["nap"]["timeout_ms"] = 60_000
    async with Dispatcher(manifest(svc, other)) as dispatcher:
        napping = asyncio.create_task(dispatcher.call("svc", "nap", {"seconds": LONG}))
        await until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"], "the call")
        with caplog.at_level(logging.INFO, logger="dispatcher"):
            took = await reload_time(dispatcher, longer, other)
        assert "changed svc@1.0.0" in caplog.text
        assert took < PROMPT, f"the reload waited {took:.1f} s for a call it ends nothing of"
        assert not napping.done()
        assert await napping == LONG
        assert sys.modules["waits_plugin"].ENDS == [(None, "whole")]


@pytest.mark.parametrize("change", ["another target", "a method dropped"])
async def test_a_call_to_a_changed_version_is_waited_for_when_its_end_ends_something(
    folder: Path, change: str
) -> None:
    # Its old target is detached (the plugin there stopped), or the dropped method's state
    # forgotten, once the call has ended: not under it.
    svc = plugin(folder, "svc")
    if change == "another target":
        changed = {**svc, "target": {**svc["target"], "entrypoint": "waits_plugin:Elsewhere"}}
    else:
        changed = {**svc, "methods": {"nap": {}}}
    async with Dispatcher(manifest(svc)) as dispatcher:
        napping = asyncio.create_task(dispatcher.call("svc", "nap", {"seconds": 1.0}))
        await until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"], "the call")
        assert await reload_time(dispatcher, changed) >= 0.6
        assert await napping == 1.0
        assert sys.modules["waits_plugin"].ENDS == [(None, "whole")]


async def test_a_call_to_a_removed_plugin_is_still_waited_for(folder: Path) -> None:
    kept, removed = plugin(folder, "kept"), plugin(folder, "removed")
    async with Dispatcher(manifest(kept, removed)) as dispatcher:
        napping = asyncio.create_task(dispatcher.call("removed", "nap", {"seconds": 1.0}))
        await asyncio.sleep(0.2)
        assert await reload_time(dispatcher, kept) >= 0.6
        assert await napping == 1.0


async def test_a_call_made_from_inside_a_kept_plugin_s_call_is_waited_for(
    folder: Path,
) -> None:
    # The outer call's route is the kept plugin's; what it reaches from inside is not
    # known before it calls: it is waited for as one that may reach anything.
    kept, removed = plugin(folder, "kept"), plugin(folder, "removed")
    async with Dispatcher(manifest(kept, removed)) as dispatcher:
        sys.modules["waits_plugin"].DISPATCHER = dispatcher
        relaying = asyncio.create_task(dispatcher.call("kept", "relay", {"seconds": 1.0}))
        await asyncio.sleep(0.2)
        assert await reload_time(dispatcher, kept) >= 0.6
        assert await relaying == 1.0


async def test_a_call_with_a_fallback_is_waited_for(folder: Path) -> None:
    # A fallback reaches another plugin through the routing table: whatever the reload
    # changes, such a call is waited for.
    kept = plugin(folder, "kept")
    kept["methods"]["nap"] = {"fallback": {"plugin": "other", "on": ["target_unavailable"]}}
    other, removed = plugin(folder, "other"), plugin(folder, "removed")
    async with Dispatcher(manifest(kept, other, removed)) as dispatcher:
        napping = asyncio.create_task(dispatcher.call("kept", "nap", {"seconds": 1.0}))
        await asyncio.sleep(0.2)
        assert await reload_time(dispatcher, kept, other) >= 0.6
        assert await napping == 1.0


async def test_a_batch_of_a_version_a_given_up_reload_changed_is_waited_for_by_the_next(
    folder: Path,
) -> None:
    # The first reload changes svc's batching (a new chain, a new batcher) and is given up
    # in its wait; the old batcher, with svc's batch in it, is left for the next reload to
    # close. That one removes another plugin: before, it waited only for the calls to that
    # plugin and closed the old batcher under svc's batch (5 s at most, then cut:
    # "the dispatcher closed mid-batch").
    seconds = 6.0  # a batch longer than a closing batcher waits for it
    batched, removed = plugin(folder, "svc"), plugin(folder, "removed")
    batched["methods"]["nap"] = {"batch": {"max_size": 1}, "timeout_ms": 30_000}
    rebatched = {**batched, "methods": {**batched["methods"], "nap": {"batch": {"max_size": 2}}}}
    async with Dispatcher(manifest(batched, removed)) as dispatcher:
        napping = asyncio.create_task(dispatcher.call("svc", "nap", {"seconds": seconds}))
        await until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"], "the call")
        changed = manifest(rebatched, removed)
        reloading = asyncio.create_task(dispatcher.reload(changed, grace=30))
        await until(lambda: dispatcher.manifest is changed, "the swap")
        reloading.cancel()  # given up in its wait for the call
        with pytest.raises(asyncio.CancelledError):
            await reloading
        await dispatcher.reload(manifest(rebatched), grace=30)
        assert await napping == seconds


def shadowed(folder: Path) -> tuple[dict[str, Any], Any]:
    """The entry of svc 1.0.0, and a manifest where 2.0.0 (slower by a second) shadows it."""
    primary = plugin(folder, "svc", config={"tag": "1.0.0"})
    primary["methods"]["nap"] = {"pure": True}
    shadow = {**primary, "version": "2.0.0", "config": {"tag": "2.0.0", "slower_by": 1.0}}
    mirrored = {
        "plugin": "svc",
        "method": "nap",
        "from": "1.0.0",
        "shadow": {"version": "2.0.0", "percent": 100},
    }
    document = {"version": 1, "plugins": [primary, shadow], "rollouts": [mirrored]}
    return primary, parse_manifest(document, base_dir=ROOT)


async def test_a_shadow_s_mirror_running_at_the_swap_is_waited_for(folder: Path) -> None:
    # The reload ends the shadow and removes its version. The mirror of a call answered
    # just before is no call in flight: before, the version was detached under it.
    primary, manifest_with_shadow = shadowed(folder)
    async with Dispatcher(manifest_with_shadow) as dispatcher:
        module = sys.modules["waits_plugin"]
        assert await dispatcher.call("svc", "nap", {"seconds": 0.05}) == 0.05
        took = await reload_time(dispatcher, primary)
        assert module.ENDS == [("1.0.0", "whole"), ("2.0.0", "whole")]
        assert took >= 0.6, f"the reload detached the shadow version after {took:.1f} s"


async def test_a_shadowed_call_in_flight_at_the_swap_mirrors_nothing_to_a_version_gone(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Its version is kept, so it does not hold the reload up; answered after the swap, it
    # starts no mirror to the version the reload is detaching (before, one started and
    # failed: "svc@2.0.0 is not started", or met the version in its stop).
    primary, manifest_with_shadow = shadowed(folder)
    async with Dispatcher(manifest_with_shadow) as dispatcher:
        module = sys.modules["waits_plugin"]
        napping = asyncio.create_task(dispatcher.call("svc", "nap", {"seconds": LONG}))
        await asyncio.sleep(0.2)
        with caplog.at_level(logging.DEBUG, logger="dispatcher.rollout"):
            took = await reload_time(dispatcher, primary)
            assert await napping == LONG
            await asyncio.sleep(0.2)  # a mirror it started would have failed by now
        assert took < PROMPT, f"the reload waited {took:.1f} s for a call to a kept version"
        assert "shadow failed" not in caplog.text
        assert module.ENDS == [("1.0.0", "whole")]


class HeldKeys:
    """A JWKS server whose fetches after the first wait until the test lets them answer:
    a key the issuer rotated in, which ``bearer`` is signed with, is fetched then."""

    def __init__(self, first: dict[str, Any], later: dict[str, Any]) -> None:
        self.documents = [first, later]
        self.fetches = 0
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.auth: dict[str, Any] = {}
        self.bearer = Credentials()

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.fetches > 1:
            self.held.set()
            await self.release.wait()
        return web.json_response(self.documents[min(self.fetches, 2) - 1])


@pytest.fixture(name="server")
async def held_keys_server() -> AsyncIterator[HeldKeys]:
    old_key, new_key = rsa_key("before"), rsa_key("rotated")
    server = HeldKeys(jwks(old_key), jwks(old_key, new_key))
    app = web.Application()
    app.router.add_get("/jwks.json", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/jwks.json"
    server.auth = {"jwt": jwt_config(url, refetch_min_interval_s=0)}
    server.bearer = Credentials(authorization=f"Bearer {new_key.token()}")
    try:
        yield server
    finally:
        server.release.set()
        await runner.cleanup()


async def test_a_call_authenticating_across_the_swap_is_routed_by_the_new_routes(
    folder: Path, server: HeldKeys
) -> None:
    # A gateway's call whose bearer token names a key the issuer just rotated in: the
    # dispatcher fetches the key set again while a reload replaces 1.0.0 by 2.0.0.
    # Before, the call was routed in the table read before it authenticated, to 1.0.0,
    # which the reload had detached meanwhile (nothing in flight reached it): it failed
    # "svc@1.0.0 is not started" instead of going to 2.0.0.
    first, second = plugin(folder, "svc"), {**plugin(folder, "svc"), "version": "2.0.0"}

    def authenticated(*plugins: dict[str, Any]) -> Any:
        return parse_manifest(
            {"version": 1, "plugins": list(plugins), "auth": server.auth}, base_dir=ROOT
        )

    async with Dispatcher(authenticated(first)) as dispatcher:
        calling = asyncio.create_task(
            dispatcher.call("svc", "nap", {"seconds": 0.1}, credentials=server.bearer)
        )
        async with asyncio.timeout(10):
            await server.held.wait()  # the call waits for the key set now
        await dispatcher.reload(authenticated(second), grace=10)
        server.release.set()
        async with asyncio.timeout(10):
            assert await calling == 0.1


async def test_a_call_authenticating_as_a_drain_begins_and_ends_is_refused(
    folder: Path, server: HeldKeys
) -> None:
    # A drain counts what is in flight; a call still fetching its caller's key set is
    # not yet. Before, the drain returned at once and the call ran after it, on targets
    # the close that follows a drain goes on to stop.
    manifest = parse_manifest(
        {"version": 1, "plugins": [plugin(folder, "svc")], "auth": server.auth}, base_dir=ROOT
    )
    async with Dispatcher(manifest) as dispatcher:
        calling = asyncio.create_task(
            dispatcher.call("svc", "nap", {"seconds": 0.1}, credentials=server.bearer)
        )
        async with asyncio.timeout(10):
            await server.held.wait()  # the call waits for the key set now
            await dispatcher.drain(grace=5)
        server.release.set()
        with pytest.raises(ShuttingDown, match="draining"):
            async with asyncio.timeout(10):
                await calling


@pytest.fixture(autouse=True)
def _forget_the_plugin_module() -> Iterator[None]:
    yield
    sys.modules.pop("waits_plugin", None)
