"""A plugin dialling in whose methods name several inbound targets: one connection serves
them all, and each setting has one rule (README, ``websocket`` targets):

* ``max_message_bytes`` and ``max_in_flight``: per target. A call is held to its own
  target's, and so is its answer; the connection reads messages up to the largest.
* ``heartbeat_ms``: the connection's, the shortest of the targets'; the gateway's pings,
  the read watch and the write stall all go by it.
* ``max_events_per_second`` and ``compress``: the connection's, and no rule combines
  them: the manifest is refused unless the targets agree.

The plugin is aiohttp on loopback speaking the frames raw, so it can answer over a
bound, hold calls, and leave pings unanswered, which the SDKs never do.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator
from typing import Any
from unittest.mock import ANY

import aiohttp
import orjson
import pytest
from aiohttp import web

from dispatcher import (
    Dispatcher,
    InvalidParams,
    ManifestError,
    Overloaded,
    ProviderError,
    TargetUnavailable,
)
from dispatcher.gateway import GatewaySettings
from dispatcher.gateway.app import create_app
from linchkit_plugin.ws_protocol import (
    MAX_MESSAGE_BYTES_HEADER,
    PLUGIN_ID_HEADER,
    PLUGIN_VERSION_HEADER,
    hello_frame,
)
from tests.conftest import manifest

TOKEN = "several-targets-token-0123456789"
#: The bounds of the two targets: a message of ``BETWEEN`` bytes is over one, under the other.
NARROW_BYTES, WIDE_BYTES, BETWEEN = 4096, 1024 * 1024, 20_000
NARROW_IN_FLIGHT = 2


#: The upgrade of plugin ``multi``: who it is, its token.
MULTI_HEADERS = {
    PLUGIN_ID_HEADER: "multi",
    PLUGIN_VERSION_HEADER: "1.0.0",
    "Authorization": f"Bearer {TOKEN}",
}


def inbound(**settings: Any) -> dict[str, Any]:
    return {"provider": "websocket", "mode": "inbound", "token": TOKEN, **settings}


def several(*, narrow_first: bool, **plugin: Any) -> dict[str, Any]:
    """Plugin ``multi``: method ``wide`` on its default target, ``narrow`` on a target of
    its own with a small message bound and few calls at once. ``narrow_first``: the
    narrow target is the first of the plugin's targets (its methods' order)."""
    narrow = {"target": inbound(max_message_bytes=NARROW_BYTES, max_in_flight=NARROW_IN_FLIGHT)}
    methods = {"narrow": narrow, "wide": {}} if narrow_first else {"wide": {}, "narrow": narrow}
    return {
        "id": "multi",
        "version": "1.0.0",
        "target": inbound(max_message_bytes=WIDE_BYTES),
        "defaults": {"timeout_ms": 10_000},
        "methods": methods,
        **plugin,
    }


@contextlib.asynccontextmanager
async def gateway_of(entry: dict[str, Any]) -> AsyncIterator[tuple[Dispatcher, str]]:
    async with Dispatcher(manifest(entry)) as dispatcher:
        runner = web.AppRunner(
            create_app(dispatcher, GatewaySettings(heartbeat=30.0)),
            handle_signals=False,
            shutdown_timeout=1,
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        try:
            yield dispatcher, f"http://{host}:{port}/v1/plugins/connect"
        finally:
            await runner.cleanup()


class RawPlugin:
    """Plugin ``multi`` dialled in: a call's params say what it answers (``size``: a
    string of that many bytes, else the params) and whether it waits for ``release``
    first (``hold``); a stream sends one chunk of ``size`` bytes. Health probes are
    answered at once; pings only if ``pongs``."""

    def __init__(
        self,
        socket: aiohttp.ClientWebSocketResponse,
        *,
        pongs: bool,
        methods: tuple[str, ...] = ("wide", "narrow"),
    ) -> None:
        self.socket = socket
        self.pongs = pongs
        self.methods = methods
        self.held: list[int] = []
        self.release = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        await self.socket.send_bytes(hello_frame("multi", "1.0.0", list(self.methods)))
        async for message in self.socket:
            if message.type == aiohttp.WSMsgType.PING:
                if self.pongs:
                    await self.socket.pong(message.data)
                continue
            frame = orjson.loads(message.data)
            if frame["type"] in ("call", "stream"):
                task = asyncio.ensure_future(self._answer(frame))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif frame["type"] == "health":
                answer = {"type": "health", "id": frame["id"], "status": "serving"}
                await self.socket.send_bytes(orjson.dumps(answer))

    async def _answer(self, frame: dict[str, Any]) -> None:
        params = frame["request"]["params"]
        if params.get("hold"):
            self.held.append(frame["id"])
            await self.release.wait()
        result = "a" * params["size"] if "size" in params else params
        if frame["type"] == "stream":
            chunk = {"type": "chunk", "id": frame["id"], "data": result}
            await self.socket.send_bytes(orjson.dumps(chunk))
            result = None
        response = {
            "type": "response",
            "id": frame["id"],
            "response": {"ok": True, "result": result},
        }
        with contextlib.suppress(ConnectionError):
            await self.socket.send_bytes(orjson.dumps(response))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def dialled_in(
    dispatcher: Dispatcher,
    url: str,
    *,
    pongs: bool = True,
    compress: int = 0,
    methods: tuple[str, ...] = ("wide", "narrow"),
) -> AsyncIterator[RawPlugin]:
    """Plugin ``multi`` connected, an instance of each of its targets' fleets (one per
    target of ``methods``); ``compress``: the permessage-deflate window its upgrade
    offers (0: none)."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            url,
            headers=MULTI_HEADERS,
            heartbeat=None,
            autoping=False,
            max_msg_size=8 * WIDE_BYTES,
            compress=compress,
        ) as socket,
    ):
        plugin = RawPlugin(socket, pongs=pongs, methods=methods)
        serving = asyncio.ensure_future(plugin.serve())
        try:
            assert dispatcher.fleets is not None
            fleets = list(dispatcher.fleets.fleets.values())
            assert len(fleets) == len(methods)
            await until(lambda: all(fleet.instances for fleet in fleets), 10)
            yield plugin
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            await plugin.aclose()


async def until(condition: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - state of other objects, polled
            await asyncio.sleep(0.01)


def channel_of(dispatcher: Dispatcher) -> Any:
    (connection,) = dispatcher.providers["websocket"].inbound.all()  # type: ignore[attr-defined]
    return connection.channel


# -- max_message_bytes: each call its own target's -----------------------------------------


@pytest.mark.parametrize("narrow_first", [True, False], ids=["narrow first", "wide first"])
async def test_an_answer_over_its_methods_bound_fails_that_call_and_no_other(
    narrow_first: bool,
) -> None:
    """The plugin answers ``narrow`` with 20 kB, over its target's 4 kB but under the
    other target's 1 MiB, which the connection reads up to. Before: the answer was taken
    (the connection's bound, the largest, was the only one). Now that call fails
    ``provider_error``; the connection stays, and ``wide`` takes 20 kB answers."""
    async with (
        gateway_of(several(narrow_first=narrow_first)) as (dispatcher, url),
        dialled_in(dispatcher, url),
    ):
        with pytest.raises(ProviderError, match="max_message_bytes=4096"):
            await dispatcher.call("multi", "narrow", {"size": BETWEEN})
        assert len(await dispatcher.call("multi", "wide", {"size": BETWEEN})) == BETWEEN
        assert await dispatcher.call("multi", "narrow", {"size": 100}) == "a" * 100
        with pytest.raises(ProviderError, match="max_message_bytes=4096"):
            [chunk async for chunk in dispatcher.stream("multi", "narrow", {"size": BETWEEN})]
        wide = [chunk async for chunk in dispatcher.stream("multi", "wide", {"size": BETWEEN})]
        assert [len(chunk) for chunk in wide] == [BETWEEN]
        channel = channel_of(dispatcher)
        assert not channel.closed, channel.close_reason
        assert channel.protocol_errors == 2  # the two over their bound, counted
        assert channel.in_flight == 0


async def test_the_upgrade_and_the_welcome_tell_the_plugin_the_largest_message_read() -> None:
    """The largest of its targets' bounds, which the connection reads up to: a plugin
    refuses its own larger answer, typed, rather than have the connection closed (1009)
    under every call on it. Each call's own, smaller bound stays the gateway's to hold.
    Said in the answer to the upgrade too, before the plugin sends anything: the events
    it kept while disconnected go out before the welcome."""
    answers: list[Any] = []

    async def answered(_session: Any, _context: Any, ended: aiohttp.TraceRequestEndParams) -> None:
        answers.append(ended.response)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(answered)
    async with (
        gateway_of(several(narrow_first=True)) as (_, url),
        aiohttp.ClientSession(trace_configs=[trace]) as session,
        session.ws_connect(url, headers=MULTI_HEADERS) as socket,
    ):
        [upgraded] = answers
        assert upgraded.status == 101
        assert upgraded.headers.getall(MAX_MESSAGE_BYTES_HEADER) == [str(WIDE_BYTES)]
        await socket.send_bytes(hello_frame("multi", "1.0.0", ["wide", "narrow"]))
        welcome = orjson.loads((await socket.receive(timeout=5)).data)
        assert welcome["type"] == "welcome"
        assert welcome["max_message_bytes"] == WIDE_BYTES


async def test_a_call_larger_than_the_plugin_says_it_reads_is_refused_before_it_is_sent() -> None:
    """The hello's ``max_message_bytes`` (8 kB) is below the connection's (1 MiB): a call
    of 20 kB is the caller's ``too_large`` error, never sent, and the connection stays."""
    async with (
        gateway_of(several(narrow_first=True)) as (dispatcher, url),
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers=MULTI_HEADERS) as socket,
    ):
        hello = orjson.loads(hello_frame("multi", "1.0.0", ["wide", "narrow"]))
        await socket.send_bytes(orjson.dumps({**hello, "max_message_bytes": 8192}))
        assert orjson.loads((await socket.receive(timeout=5)).data)["type"] == "welcome"
        assert dispatcher.fleets is not None
        fleets = list(dispatcher.fleets.fleets.values())
        await until(lambda: all(fleet.instances for fleet in fleets), 10)
        with pytest.raises(InvalidParams, match="the plugin reads") as refused:
            await dispatcher.call("multi", "wide", {"size": BETWEEN, "pad": "p" * BETWEEN})
        assert refused.value.details == {"reason": "too_large", "bytes": ANY, "limit": 8192}
        assert channel_of(dispatcher).plugin_reads == 8192
        assert not channel_of(dispatcher).closed


@pytest.mark.parametrize("narrow_first", [True, False], ids=["narrow first", "wide first"])
async def test_a_call_is_refused_over_its_own_methods_bound_before_it_is_sent(
    narrow_first: bool,
) -> None:
    """A call of 20 kB: over ``narrow``'s bound, under ``wide``'s. Before: every call on
    the connection was held to the first target's bound, so one of the two was wrong
    (``narrow``'s sent when ``wide`` came first, ``wide``'s refused when ``narrow`` did)."""
    blob = "b" * BETWEEN
    async with (
        gateway_of(several(narrow_first=narrow_first)) as (dispatcher, url),
        dialled_in(dispatcher, url),
    ):
        with pytest.raises(InvalidParams, match="max_message_bytes=4096"):
            await dispatcher.call("multi", "narrow", {"blob": blob})
        assert await dispatcher.call("multi", "wide", {"blob": blob}) == {"blob": blob}


# -- max_in_flight: each target's calls capped by its own ----------------------------------


@pytest.mark.parametrize("narrow_first", [True, False], ids=["narrow first", "wide first"])
async def test_calls_in_flight_are_capped_per_target(narrow_first: bool) -> None:
    """``narrow`` allows 2 calls at once, ``wide`` the default 4096. Before: the first
    target's cap held for both, so ``narrow`` took a third call when ``wide`` came first,
    and ``wide`` was refused its third when ``narrow`` did."""
    async with (
        gateway_of(several(narrow_first=narrow_first)) as (dispatcher, url),
        dialled_in(dispatcher, url) as plugin,
    ):
        narrow = [
            asyncio.ensure_future(dispatcher.call("multi", "narrow", {"hold": True, "n": n}))
            for n in range(NARROW_IN_FLIGHT)
        ]
        await until(lambda: len(plugin.held) == NARROW_IN_FLIGHT, 5)
        with pytest.raises(Overloaded, match="max_in_flight"):
            await dispatcher.call("multi", "narrow", {"n": "one too many"})
        wide = [
            asyncio.ensure_future(dispatcher.call("multi", "wide", {"hold": True, "n": n}))
            for n in range(5)
        ]
        await until(lambda: len(plugin.held) == NARROW_IN_FLIGHT + 5, 5)
        plugin.release.set()
        answers = await asyncio.gather(*narrow, *wide)
        assert [answer["n"] for answer in answers] == [0, 1, 0, 1, 2, 3, 4]
        assert await dispatcher.call("multi", "narrow", {"n": "after"}) == {"n": "after"}


# -- heartbeat_ms: the connection's, the shortest ------------------------------------------


async def test_a_plugin_with_two_heartbeats_is_held_to_the_shortest_everywhere() -> None:
    """``wide`` says a heartbeat of 5 s, ``narrow`` 0.2 s; the plugin answers its health
    probes (so its read watch keeps it) but no ping. The connection goes by the shortest
    in all its liveness checks: pinged every 0.2 s, found gone within it rather than
    within the 7.5 s the other target would allow; its read watch and write stall bound
    at 1.5 of it."""
    entry = several(narrow_first=False)
    entry["target"] = inbound(heartbeat_ms=5_000)
    entry["methods"]["narrow"] = {"target": inbound(heartbeat_ms=200)}
    async with (
        gateway_of(entry) as (dispatcher, url),
        dialled_in(dispatcher, url, pongs=False),
    ):
        channel = channel_of(dispatcher)
        assert channel._read_watch.bound == pytest.approx(0.3)
        assert channel._writer.stall_after == pytest.approx(0.3)
        await until(lambda: channel.closed, 3)
        assert "1006" in channel.close_reason, channel.close_reason


# -- max_events_per_second: the connection's, the targets must agree ------------------------


def test_inbound_targets_that_disagree_on_the_event_rate_are_refused_at_load() -> None:
    """Events are the plugin's, not a method's: one rate for the connection. Before: the
    first target's rate held, and the manifest did not say which that was."""
    entry = several(narrow_first=False)
    entry["methods"]["narrow"]["target"]["max_events_per_second"] = 500
    with pytest.raises(ManifestError) as raised:
        manifest(entry)
    (problem,) = raised.value.problems
    assert problem.path == "plugins[0].methods.narrow.target.max_events_per_second"
    assert "multi@1.0.0" in problem.message
    assert "500 here, 10000 on its target" in problem.message


def test_inbound_targets_that_agree_on_the_event_rate_load() -> None:
    """Agreeing: written alike, or one written as the default the other leaves unset. A
    default target that every method overrides serves no call: it is not compared."""
    entry = several(narrow_first=False)
    entry["methods"]["narrow"]["target"]["max_events_per_second"] = 10_000
    manifest(entry)
    entry["target"]["max_events_per_second"] = 500
    entry["methods"]["wide"] = {"target": inbound(max_events_per_second=10_000)}
    manifest(entry)


# -- token and principal: the upgrade's, every target must admit them -----------------------


@pytest.mark.parametrize(
    ("setting", "other"),
    [("token", "a-token-of-another-target-0123456789"), ("principal", "another-principal")],
)
def test_inbound_targets_no_one_credential_admits_are_refused_at_load(
    setting: str, other: str
) -> None:
    """The plugin's upgrade presents one token and is one principal, and each of its
    inbound targets must admit it. Before: two targets writing two tokens (a rotation
    written on one method's target) loaded, and the plugin was refused 401 at every
    upgrade, whichever token it held: not one call of any of its methods was served.
    The token is never shown."""
    entry = several(narrow_first=False)
    if setting == "principal":
        entry["target"]["principal"] = "the-principal"
    entry["methods"]["narrow"]["target"][setting] = other
    with pytest.raises(ManifestError) as raised:
        manifest(entry)
    (problem,) = raised.value.problems
    assert problem.path == f"plugins[0].methods.narrow.target.{setting}"
    assert "multi@1.0.0 dials in over one connection" in problem.message
    if setting == "token":
        assert "this token is not the one on its target" in problem.message
        assert TOKEN not in problem.message and other not in problem.message
    else:
        assert "'another-principal' here, 'the-principal' on its target" in problem.message


def test_inbound_targets_may_leave_a_credential_to_another() -> None:
    """One target with the token alone, another with it and a principal too: one
    upgrade (that token, authenticated as that principal) is admitted by both."""
    entry = several(narrow_first=False)
    entry["methods"]["narrow"]["target"]["principal"] = "the-principal"
    manifest(entry)


async def test_inbound_targets_agreeing_on_their_token_admit_the_plugin() -> None:
    """Both targets write the same token: the plugin connects (as every test here does),
    and calls of both methods are served."""
    entry = several(narrow_first=False)
    assert entry["methods"]["narrow"]["target"]["token"] == entry["target"]["token"]
    async with gateway_of(entry) as (dispatcher, url), dialled_in(dispatcher, url):
        assert await dispatcher.call("multi", "narrow", {"n": 1}) == {"n": 1}


# -- compress: the connection's, the targets must agree -------------------------------------


def test_inbound_targets_that_disagree_on_compress_are_refused_at_load() -> None:
    """permessage-deflate is negotiated once, at the upgrade, for every message of the
    connection: one target's calls cannot go deflated and another's not, and neither
    choice is right for the target that asked the other. Before: the gateway took the
    plugin's offer whatever either said."""
    entry = several(narrow_first=False)
    entry["methods"]["narrow"]["target"]["compress"] = True
    with pytest.raises(ManifestError) as raised:
        manifest(entry)
    (problem,) = raised.value.problems
    assert problem.path == "plugins[0].methods.narrow.target.compress"
    assert "True here, False on its target" in problem.message


async def test_inbound_targets_that_agree_on_compress_have_it_negotiated() -> None:
    """Both targets say ``compress: true``: the plugin's offer is taken, and calls of
    both go over the deflated connection."""
    entry = several(narrow_first=False)
    entry["target"]["compress"] = True
    entry["methods"]["narrow"]["target"]["compress"] = True
    async with (
        gateway_of(entry) as (dispatcher, url),
        dialled_in(dispatcher, url, compress=15) as plugin,
    ):
        assert plugin.socket.compress == 15
        assert await dispatcher.call("multi", "wide", {"size": BETWEEN}) == "a" * BETWEEN
        assert await dispatcher.call("multi", "narrow", {"n": 1}) == {"n": 1}


# -- a reload that gives the version another inbound target ---------------------------------


def with_third(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` (the same version) with method ``third`` on an inbound target of its own."""
    changed = copy.deepcopy(entry)
    changed["methods"]["third"] = {"target": inbound(max_in_flight=3)}
    return changed


async def test_a_reload_adding_an_inbound_target_has_the_plugin_connect_again_to_serve_it() -> None:
    """Plugin ``multi`` is connected for its two targets; a reload of the same version
    routes a new method, ``third``, to a third inbound target. Before: the connection
    stayed open, joined to the two fleets it was admitted to and never to the new one,
    and every call of ``third`` failed ``has no instance`` for as long as the plugin
    stayed connected. Now the connection goes away: no new call is sent on it, the call
    it runs past the reload's grace is answered, and then it closes 1012 (connect
    again); dialled again, the plugin is admitted to all three."""
    entry = several(narrow_first=False)
    async with gateway_of(entry) as (dispatcher, url):
        async with dialled_in(dispatcher, url) as plugin:
            held = asyncio.ensure_future(dispatcher.call("multi", "wide", {"hold": True}))
            await until(lambda: plugin.held, 5)
            await dispatcher.reload(manifest(with_third(entry)), grace=0.1)
            assert not plugin.socket.closed  # a call runs on it: it is answered first
            with pytest.raises(TargetUnavailable):  # it takes no new call meanwhile
                await dispatcher.call("multi", "wide", {"n": 1})
            plugin.release.set()
            assert await held == {"hold": True}
            await until(lambda: plugin.socket.closed, 5)
            assert plugin.socket.close_code == 1012
        async with dialled_in(dispatcher, url, methods=("wide", "narrow", "third")):
            assert await dispatcher.call("multi", "third", {"n": 3}) == {"n": 3}
            assert await dispatcher.call("multi", "narrow", {"n": 2}) == {"n": 2}
            channel = channel_of(dispatcher)
            assert not channel.closed, channel.close_reason
            assert channel.in_flight == 0


async def test_that_reload_given_up_in_its_wait_leaves_the_next_to_have_it_connect_again() -> None:
    """The same reload, given up while it waits for the call in flight (its caller
    cancelled it, or a newer registry change replaced it): the connection stays joined
    to the two fleets alone. Before, the next reload, which changed nothing itself, left
    it so, and every call of ``third`` failed for as long as the plugin stayed connected.
    Now it has the connection go away as the given-up one would have (1012), and the
    plugin, dialled again, serves all three."""
    entry = several(narrow_first=False)
    changed = manifest(with_third(entry))
    async with gateway_of(entry) as (dispatcher, url):
        async with dialled_in(dispatcher, url) as plugin:
            held = asyncio.ensure_future(dispatcher.call("multi", "wide", {"hold": True}))
            await until(lambda: plugin.held, 5)
            reload = asyncio.ensure_future(dispatcher.reload(changed, grace=30))
            await until(lambda: dispatcher.manifest is changed, 5)
            reload.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reload
            plugin.release.set()
            assert await held == {"hold": True}
            with pytest.raises(TargetUnavailable, match="no instance"):
                await dispatcher.call("multi", "third", {"n": 3})
            assert (await dispatcher.reload(changed, grace=30))["kept"] == ["multi@1.0.0"]
            await until(lambda: plugin.socket.closed, 5)
            assert plugin.socket.close_code == 1012
        async with dialled_in(dispatcher, url, methods=("wide", "narrow", "third")):
            assert await dispatcher.call("multi", "third", {"n": 3}) == {"n": 3}


async def test_a_plugin_admitted_before_that_reload_saying_hello_after_connects_again() -> None:
    """Admitted at the upgrade to the version's two targets, the plugin says its hello
    only after the reload added the third: it is closed 1012 right after its welcome,
    not registered in the two fleets alone."""
    entry = several(narrow_first=False)
    async with (
        gateway_of(entry) as (dispatcher, url),
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers=MULTI_HEADERS) as socket,
    ):
        await dispatcher.reload(manifest(with_third(entry)), grace=1)
        await socket.send_bytes(hello_frame("multi", "1.0.0", ["wide", "narrow", "third"]))
        welcome = await socket.receive(timeout=5)
        assert orjson.loads(welcome.data)["type"] == "welcome"
        closing = await socket.receive(timeout=5)
        assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1012)
        assert "a reload changed the inbound targets of multi@1.0.0" in closing.extra
        provider = dispatcher.providers["websocket"]
        await until(lambda: not provider.inbound.all(), 5)  # type: ignore[attr-defined]


# -- a stream its caller closes ends then, on every target ----------------------------------


async def test_a_stream_its_caller_closes_is_no_longer_in_flight_once_the_close_returns() -> None:
    """The caller takes one chunk of a ``narrow`` stream and closes it. Before: the
    provider's and the fleet's wrappers left the channel's stream to the garbage
    collector, so when the close returned it still counted against ``narrow``'s
    ``max_in_flight`` (and the plugin was told to stop only later): two such streams and
    a call of ``narrow`` straight after could be refused ``overloaded``. Now the close
    ends it at once, and nothing is left in flight."""
    async with (
        gateway_of(several(narrow_first=False)) as (dispatcher, url),
        dialled_in(dispatcher, url),
    ):
        channel = channel_of(dispatcher)
        (connection,) = dispatcher.providers["websocket"].inbound.all()  # type: ignore[attr-defined]
        for _ in range(NARROW_IN_FLIGHT):
            async with contextlib.aclosing(
                dispatcher.stream("multi", "narrow", {"size": 10})
            ) as chunks:
                assert await anext(chunks) == "a" * 10
            assert channel.in_flight == 0
            assert [limits.in_flight for limits in connection.limits.values()] == [0]
        assert await dispatcher.call("multi", "narrow", {"n": 1}) == {"n": 1}
