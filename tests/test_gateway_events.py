"""The gateway's WebSocket (/v1/events): plugin events from a real plugin, host events to
it, resume without gaps or duplicates, a gap said out loud, slow consumers cut off."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from dispatcher import Dispatcher, parse_manifest
from dispatcher.gateway import TOO_SLOW, GatewayServer, GatewaySettings, rechecks
from dispatcher.gateway.rechecks import CREDENTIALS_ENDED
from dispatcher.identity import Credentials, Principal
from linchkit_plugin.errors import TargetUnavailable, Unauthorized
from tests.conftest import manifest
from tests.gateway_support import (
    SECRET_TOKEN,
    OneToken,
    echo_entry,
    eventful_entry,
    example_entry,
    raw_connection,
    running_gateway,
)
from tests.identity_support import good_claims, jwt_config, rsa_key, write_jwks


async def burst(
    session: aiohttp.ClientSession, url: str, count: int, size: int = 0, **headers: str
) -> None:
    async with session.post(
        f"{url}/v1/plugins/events/methods/burst",
        json={"name": "tick", "count": count, "size": size},
        headers=headers,
    ) as answer:
        assert answer.status == 200, await answer.text()


async def frames(
    ws: aiohttp.ClientWebSocketResponse, count: int, kind: str = "event"
) -> list[dict[str, Any]]:
    """The next ``count`` frames of ``kind`` (others are kept out)."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(20):
        while len(got) < count:
            frame = await ws.receive_json(loads=orjson.loads)
            if frame["type"] == kind:
                got.append(frame)
    return got


async def test_a_subscriber_receives_the_events_a_plugin_emits_with_growing_ids() -> None:
    async with running_gateway() as (_, server), aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/v1/events?plugin=events&event=tick") as ws:
            (subscribed,) = await frames(ws, 1, "subscribed")
            assert subscribed["last_event_id"] == 0
            await burst(session, server.url, 5)
            events = await frames(ws, 5)
        assert [event["data"]["n"] for event in events] == [0, 1, 2, 3, 4]
        assert [event["id"] for event in events] == [1, 2, 3, 4, 5]
        assert {(event["plugin"], event["version"], event["event"]) for event in events} == {
            ("events", "1.0.0", "tick")
        }


async def test_events_of_a_plugin_a_reload_adds_reach_subscribers() -> None:
    async with (
        running_gateway(echo_entry()) as (dispatcher, server),
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.url}/v1/events?plugin=events") as ws,
    ):
        await frames(ws, 1, "subscribed")
        summary = await dispatcher.reload(manifest(echo_entry(), eventful_entry()))
        assert summary["added"] == ["events@1.0.0"]
        await burst(session, server.url, 2)
        events = await frames(ws, 2)
        assert [(event["version"], event["data"]["n"]) for event in events] == [
            ("1.0.0", 0),
            ("1.0.0", 1),
        ]


async def test_filters_in_the_first_frame_and_host_events_published_to_a_plugin() -> None:
    entries = (eventful_entry(), example_entry())
    async with (
        running_gateway(*entries) as (_, server),
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.url}/v1/events") as ws,
    ):
        await ws.send_json(
            {"type": "subscribe", "filters": [{"plugin": "example", "event": "pong"}]}
        )
        await frames(ws, 1, "subscribed")
        await burst(session, server.url, 3)  # another plugin's: filtered out
        await ws.send_json(
            {
                "type": "publish",
                "plugin": "example",
                "event": "ping",
                "data": {"k": 1},
                "ref": 7,
            }
        )
        (published,) = await frames(ws, 1, "published")
        assert published["ref"] == 7
        (pong,) = await frames(ws, 1)
        assert (pong["event"], pong["data"], pong["id"]) == ("pong", {"k": 1}, 4)
        assert (pong["plugin"], pong["version"]) == ("example", "1.0.0")
        await ws.send_json({"type": "publish", "plugin": "ghost", "event": "ping", "ref": "x"})
        (error,) = await frames(ws, 1, "error")
        assert (error["ref"], error["error"]["type"]) == ("x", "plugin_not_found")


async def test_bad_frames_get_typed_errors_and_the_connection_stays() -> None:
    async with running_gateway() as (_, server), aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/v1/events") as ws:
            for bad in (
                "{nope",
                "[]",
                '{"type": "dance"}',
                '{"type": "subscribe", "filters": 3}',
                '{"type": "subscribe", "last_event_id": -1}',
                '{"type": "publish", "plugin": 1}',
            ):
                await ws.send_str(bad)
                (error,) = await frames(ws, 1, "error")
                assert error["error"]["type"] == "invalid_params", bad
            await ws.send_bytes(b"\x00\x01")
            await frames(ws, 1, "error")
            await ws.send_json({"type": "subscribe"})
            await frames(ws, 1, "subscribed")
            await ws.send_json({"type": "subscribe"})
            (error,) = await frames(ws, 1, "error")
            assert "subscribed already" in error["error"]["message"]
        async with session.get(f"{server.url}/v1/events?last_event_id=x") as answer:
            assert answer.status == 400


async def test_a_resume_from_another_gateways_stream_starts_from_this_ones_first_event() -> None:
    """After a restart ids start again at 1: the last id of the gateway that was gone
    must not skip this one's events (nor a gap be hidden)."""
    async with running_gateway() as (_, server), aiohttp.ClientSession() as session:
        await burst(session, server.url, 3)
        async with session.ws_connect(f"{server.url}/v1/events") as ws:
            await ws.send_json({"type": "subscribe", "last_event_id": 0})
            (subscribed,) = await frames(ws, 1, "subscribed")
            stream = subscribed["stream"]
            assert isinstance(stream, str) and len(stream) == 16
            assert [event["id"] for event in await frames(ws, 3)] == [1, 2, 3]
        # The first resume adds event 4; the second, of a stream gone, replays it too.
        resumes = {stream: [], "an-older-gateway": [1, 2, 3, 4]}
        for resumed_stream, expected in resumes.items():
            async with session.ws_connect(f"{server.url}/v1/events") as ws:
                await ws.send_json(
                    {"type": "subscribe", "last_event_id": 3, "stream": resumed_stream}
                )
                await frames(ws, 1, "subscribed")
                await burst(session, server.url, 1)  # a live event marks the replay's end
                got = [event["id"] for event in await frames(ws, len(expected) + 1)]
                assert got[:-1] == expected, resumed_stream
        async with session.ws_connect(f"{server.url}/v1/events") as ws:
            await ws.send_json({"type": "subscribe", "stream": 7})
            (error,) = await frames(ws, 1, "error")
            assert error["error"]["type"] == "invalid_params"


async def test_a_reconnecting_subscriber_resumes_without_gaps_or_duplicates() -> None:
    async with running_gateway() as (_, server), aiohttp.ClientSession() as session:
        seen: list[int] = []
        async with session.ws_connect(f"{server.url}/v1/events?plugin=events") as ws:
            await frames(ws, 1, "subscribed")
            await burst(session, server.url, 10)
            seen += [event["id"] for event in await frames(ws, 4)]
        # Gone after 4 of 10; 10 more are emitted while it is away, and 10 while it resumes.
        await burst(session, server.url, 10)
        url = f"{server.url}/v1/events?plugin=events&last_event_id={seen[-1]}"
        async with session.ws_connect(url) as ws:
            emitting = asyncio.create_task(burst(session, server.url, 10))
            seen += [event["id"] for event in await frames(ws, 26)]
            await emitting
        assert seen == list(range(1, 31))


async def test_a_resume_past_the_buffer_is_told_its_gap() -> None:
    settings = GatewaySettings(port=0, event_buffer=5)
    async with (
        running_gateway(settings=settings) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        await burst(session, server.url, 20)
        async with session.ws_connect(f"{server.url}/v1/events?last_event_id=3") as ws:
            (gap,) = await frames(ws, 1, "gap")
            assert gap == {"type": "gap", "after": 3, "resumed_at": 16}
            assert [event["id"] for event in await frames(ws, 5)] == [16, 17, 18, 19, 20]


async def test_a_resume_that_replays_a_full_ring_is_not_cut_off_for_it() -> None:
    """As by default, the ring holds as many events as a subscriber may have queued: the
    replay of all of it, with the subscribed and gap frames before it, must fit, or the
    client is closed with 4008 on every resume and never catches up."""
    settings = GatewaySettings(port=0, event_buffer=20, max_pending_events=20)
    async with (
        running_gateway(settings=settings) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        await burst(session, server.url, 30)
        async with session.ws_connect(f"{server.url}/v1/events?last_event_id=1") as ws:
            (gap,) = await frames(ws, 1, "gap")
            assert gap["resumed_at"] == 11
            assert [event["id"] for event in await frames(ws, 20)] == list(range(11, 31))
            await burst(session, server.url, 1)
            assert [event["id"] for event in await frames(ws, 1)] == [31]


async def test_a_consumer_that_does_not_read_is_cut_off_and_others_get_everything() -> None:
    settings = GatewaySettings(port=0, max_pending_events=20)
    async with (
        running_gateway(settings=settings) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        hub = server.hub
        assert hub is not None
        async with (
            raw_connection(server.url) as (reader, writer),
            session.ws_connect(f"{server.url}/v1/events?plugin=events") as reading,
        ):
            key = base64.b64encode(os.urandom(16))
            writer.write(
                b"GET /v1/events?plugin=events HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
                + key
                + b"\r\n\r\n"
            )
            await writer.drain()
            async with asyncio.timeout(10):
                assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
            await frames(reading, 1, "subscribed")
            assert hub.subscribers == 2
            received: list[dict[str, Any]] = []

            async def keep_reading() -> None:
                async for message in reading:
                    frame = orjson.loads(message.data)
                    if frame["type"] == "event":
                        received.append(frame)

            reader_task = asyncio.create_task(keep_reading())
            try:
                # The raw one never reads: 64 KB events fill the socket buffers, then its
                # queue, which it leaves unsent from one look of the hub to the next.
                for _ in range(60):
                    await burst(session, server.url, 20, size=64 * 1024)
                    if hub.subscribers == 1:
                        break
                    await asyncio.sleep(0.1)
                assert hub.subscribers == 1
                async with asyncio.timeout(20):
                    while len(received) < hub.last_event_id:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            finally:
                reader_task.cancel()
                await asyncio.gather(reader_task, return_exceptions=True)
            assert [event["id"] for event in received] == list(range(1, hub.last_event_id + 1))
            # What the slow one finally reads ends with the close code 4008.
            rest = await asyncio.wait_for(reader.read(), 20)
            while not reader.at_eof():
                rest += await asyncio.wait_for(reader.read(1 << 20), 20)
            assert TOO_SLOW.to_bytes(2, "big") + b"too slow" in rest


async def test_events_need_credentials_when_the_gateway_has_an_authenticator() -> None:
    async with (
        running_gateway(authenticator=OneToken()) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        headers = {"Authorization": f"Bearer {SECRET_TOKEN}"}
        async with session.ws_connect(
            f"{server.url}/v1/events?plugin=events", headers=headers
        ) as ws:
            await frames(ws, 1, "subscribed")
            await burst(session, server.url, 1, **headers)
            assert len(await frames(ws, 1)) == 1


def two_versions() -> tuple[dict[str, Any], dict[str, Any]]:
    """The eventful plugin in 1.0.0 and 2.0.0 at once, as during a rollout: both emit."""
    return eventful_entry(), {**eventful_entry(), "version": "2.0.0"}


async def burst_from(session: aiohttp.ClientSession, url: str, version: str, count: int) -> None:
    await burst(session, url, count, **{"X-Plugin-Version": version})


async def test_a_filter_naming_a_version_receives_only_that_versions_events() -> None:
    """A host pinned to 1.0.0 during a rollout must not take 2.0.0's events for its own;
    a filter without a version still receives both, and a resume keeps the version."""
    async with (
        running_gateway(*two_versions()) as (_, server),
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.url}/v1/events") as first,
        session.ws_connect(f"{server.url}/v1/events?plugin=events&version=2.0.0") as second,
        session.ws_connect(f"{server.url}/v1/events?plugin=events") as every,
    ):
        await first.send_json(
            {"type": "subscribe", "filters": [{"plugin": "events", "version": "1.0.0"}]}
        )
        (subscribed,) = await frames(first, 1, "subscribed")
        for ws in (second, every):
            await frames(ws, 1, "subscribed")
        for version, count in (("1.0.0", 2), ("2.0.0", 3), ("1.0.0", 1)):
            await burst_from(session, server.url, version, count)
        got_first = [(event["id"], event["version"]) for event in await frames(first, 3)]
        got_second = [(event["id"], event["version"]) for event in await frames(second, 3)]
        got_every = [event["id"] for event in await frames(every, 6)]
        assert got_first == [(1, "1.0.0"), (2, "1.0.0"), (6, "1.0.0")]
        assert got_second == [(3, "2.0.0"), (4, "2.0.0"), (5, "2.0.0")]
        assert got_every == [1, 2, 3, 4, 5, 6]
        # Resuming after id 1: the replay holds 1.0.0's 2 and 6, not 2.0.0's 3-5; then
        # live ones of 1.0.0 only (7 is 2.0.0's, 8 marks the end).
        async with session.ws_connect(f"{server.url}/v1/events") as resumed:
            await resumed.send_json(
                {
                    "type": "subscribe",
                    "filters": [{"plugin": "events", "version": "1.0.0"}],
                    "last_event_id": 1,
                    "stream": subscribed["stream"],
                }
            )
            await frames(resumed, 1, "subscribed")
            await burst_from(session, server.url, "2.0.0", 1)
            await burst_from(session, server.url, "1.0.0", 1)
            assert [event["id"] for event in await frames(resumed, 3)] == [2, 6, 8]


async def test_a_bad_version_in_a_filter_gets_a_typed_error_and_the_connection_stays() -> None:
    async with (
        running_gateway(*two_versions()) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        async with session.ws_connect(f"{server.url}/v1/events") as ws:
            for version in (7, True, ["1.0.0"], {"v": 1}, "", "1" * 100_000, "1.0.0\n"):
                await ws.send_json(
                    {"type": "subscribe", "filters": [{"plugin": "events", "version": version}]}
                )
                (error,) = await frames(ws, 1, "error")
                assert error["error"]["type"] == "invalid_params", str(version)[:40]
                assert "version" in error["error"]["message"]
                assert len(error["error"]["message"]) < 300  # the huge one is not echoed
            await ws.send_json(
                {"type": "subscribe", "filters": [{"plugin": "events", "version": "2.0.0"}]}
            )
            await frames(ws, 1, "subscribed")
            await burst_from(session, server.url, "1.0.0", 1)
            await burst_from(session, server.url, "2.0.0", 1)
            (event,) = await frames(ws, 1)
            assert (event["id"], event["version"]) == (2, "2.0.0")
        for query in ("version=" + "9" * 5000, "version=", "version=1.0%00"):
            async with session.get(f"{server.url}/v1/events?plugin=events&{query}") as answer:
                assert answer.status == 400, query
                body = await answer.json()
                assert body["error"]["type"] == "invalid_params"


async def test_a_fast_consumer_takes_a_burst_larger_than_max_pending_events_whole() -> None:
    """A plugin emitting in one loop records every event before the gateway's sender may
    write one: a consumer is behind only by what it has had time to take and has not, so
    one that reads keeps its connection and receives the whole burst, up to the ring."""
    settings = GatewaySettings(port=0, event_buffer=3000, max_pending_events=1000)
    async with (
        running_gateway(settings=settings) as (_, server),
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.url}/v1/events?plugin=events") as ws,
    ):
        await frames(ws, 1, "subscribed")
        await burst(session, server.url, 3000)
        events = await frames(ws, 3000)
        assert [event["id"] for event in events] == list(range(1, 3001))
        await burst(session, server.url, 1)
        assert [event["id"] for event in await frames(ws, 1)] == [3001]
        assert not ws.closed


async def test_a_burst_larger_than_the_ring_closes_a_consumer_once_and_the_resume_says_the_gap() -> (
    None
):
    """Events past the ring cannot wait for anyone: the consumer is closed once (4008) and
    resumes from its last id, told what the ring no longer holds."""
    settings = GatewaySettings(port=0, event_buffer=1000, max_pending_events=1000)
    async with (
        running_gateway(settings=settings) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        async with session.ws_connect(f"{server.url}/v1/events?plugin=events") as ws:
            await frames(ws, 1, "subscribed")
            await burst(session, server.url, 1500)
            async with asyncio.timeout(10):
                message = await ws.receive()
                while message.type == aiohttp.WSMsgType.TEXT:
                    message = await ws.receive()
            assert ws.close_code == TOO_SLOW
        async with session.ws_connect(f"{server.url}/v1/events?last_event_id=0") as ws:
            (gap,) = await frames(ws, 1, "gap")
            assert gap == {"type": "gap", "after": 0, "resumed_at": 501}
            assert [event["id"] for event in await frames(ws, 1000)] == list(range(501, 1501))


async def test_a_stream_ends_when_the_token_it_was_opened_with_expires(tmp_path: Path) -> None:
    """A stream is authenticated at its upgrade. Checked then only, one opened with a
    token valid for two seconds received events (and could publish) for as long as it
    stayed open; now it is closed with 1008 once the token has expired."""
    key = rsa_key("stream-key")
    write_jwks(tmp_path / "jwks.json", key)
    loaded = parse_manifest(
        {
            "version": 1,
            "plugins": [eventful_entry()],
            "auth": {"jwt": jwt_config("jwks.json", leeway_s=0)},
        },
        base_dir=tmp_path,
    )
    token = key.token(good_claims(exp=int(time.time()) + 2))
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        Dispatcher(loaded) as dispatcher,
        GatewayServer(dispatcher, GatewaySettings(port=0)) as server,
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.url}/v1/events?plugin=events", headers=headers) as ws,
    ):
        await frames(ws, 1, "subscribed")
        await burst(session, server.url, 1, **headers)
        assert len(await frames(ws, 1)) == 1  # while the token holds
        async with asyncio.timeout(15):
            while (await ws.receive()).type not in _CLOSED:
                pass
        assert ws.close_code == CREDENTIALS_ENDED
        assert time.time() >= token_exp(token)


_CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


def token_exp(token: str) -> int:
    payload = token.split(".")[1]
    exp = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]
    assert isinstance(exp, int)
    return exp


class _Changing:
    """A host's authenticator whose answer the test changes while a stream is open."""

    def __init__(self, expires_at: float | None = None) -> None:
        self.answer: Exception | None = None
        self.expires_at = expires_at
        self.asked = 0

    async def authenticate(self, credentials: Credentials) -> Principal:
        self.asked += 1
        if self.answer is not None:
            raise self.answer
        return Principal("alice", expires_at=self.expires_at)


async def test_a_stream_whose_credentials_cannot_be_checked_stays_until_they_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a refusal ends a stream: an authenticator that cannot answer for a while (its
    backend down: a retryable error) leaves the stream it admitted open."""
    monkeypatch.setattr(rechecks, "RECHECK_SECONDS", 0.1)
    authenticator = _Changing()
    async with (
        running_gateway(authenticator=authenticator) as (_, server),
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.url}/v1/events?plugin=events") as ws,
    ):
        await frames(ws, 1, "subscribed")
        authenticator.answer = TargetUnavailable("the identity backend is down")
        asked = authenticator.asked
        async with asyncio.timeout(10):
            while authenticator.asked < asked + 3:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert not ws.closed
        authenticator.answer = None
        await burst(session, server.url, 1)
        assert len(await frames(ws, 1)) == 1
        authenticator.answer = Unauthorized("revoked")
        async with asyncio.timeout(10):
            while (await ws.receive()).type not in _CLOSED:
                pass
        assert ws.close_code == CREDENTIALS_ENDED


async def test_an_authenticator_accepting_past_the_expiry_it_gave_is_not_asked_in_a_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A principal whose ``expires_at`` has passed, and which its authenticator still
    accepts, is checked again at the usual pace, not every few milliseconds."""
    monkeypatch.setattr(rechecks, "RECHECK_SECONDS", 0.5)
    authenticator = _Changing(expires_at=time.time() - 10)
    async with (
        running_gateway(authenticator=authenticator) as (_, server),
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.url}/v1/events?plugin=events") as ws,
    ):
        await frames(ws, 1, "subscribed")
        asked = authenticator.asked
        await asyncio.sleep(1.2)
        assert authenticator.asked - asked <= 3, authenticator.asked - asked
        assert not ws.closed


class _CountingKeys:
    """A host's authenticator (the seam's own, as a host writes one) that accepts the API
    keys it holds, counts every check per key, and refuses a key once revoked or once
    the proof it gave has expired (as a JWT's ``exp``)."""

    def __init__(self, **expires_at: float) -> None:
        self.expires_at = expires_at
        self.revoked: set[str] = set()
        self.asked: Counter[str] = Counter()

    async def authenticate(self, credentials: Credentials) -> Principal:
        key = credentials.api_key or ""
        self.asked[key] += 1
        expires_at = self.expires_at.get(key)
        if key in self.revoked or (expires_at is not None and time.time() >= expires_at):
            raise Unauthorized("revoked")
        return Principal(f"holder-{key}", expires_at=expires_at)


async def _open_streams(
    stack: contextlib.AsyncExitStack, session: aiohttp.ClientSession, url: str, key: str, n: int
) -> list[aiohttp.ClientWebSocketResponse]:
    streams = [
        await stack.enter_async_context(
            session.ws_connect(f"{url}/v1/events?plugin=events", headers={"X-API-Key": key})
        )
        for _ in range(n)
    ]
    for ws in streams:
        await frames(ws, 1, "subscribed")
    return streams


async def _until_closed(ws: aiohttp.ClientWebSocketResponse) -> None:
    async with asyncio.timeout(5):
        while (await ws.receive()).type not in _CLOSED:
            pass


async def test_streams_holding_the_same_credentials_share_one_recheck_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: each stream re-checked its credentials on its own timer, so 8 streams
    opened with one API key cost the host's authenticator 8 calls per interval. Now one
    per distinct credentials, whose answer every stream holding them takes: a refusal
    ends all 8 at once, and the streams of another key are checked, and kept, apart."""
    monkeypatch.setattr(rechecks, "RECHECK_SECONDS", 0.1)
    authenticator = _CountingKeys()
    async with (
        running_gateway(authenticator=authenticator) as (_, server),
        aiohttp.ClientSession() as session,
        contextlib.AsyncExitStack() as stack,
    ):
        shared = await _open_streams(stack, session, server.url, "a", 8)
        others = await _open_streams(stack, session, server.url, "b", 2)
        before = authenticator.asked.copy()
        started = time.monotonic()
        await asyncio.sleep(0.55)
        rounds = (time.monotonic() - started) / 0.1
        checked_a = authenticator.asked["a"] - before["a"]
        checked_b = authenticator.asked["b"] - before["b"]
        assert 2 <= checked_a <= rounds + 1, (checked_a, rounds)
        assert 2 <= checked_b <= rounds + 1, (checked_b, rounds)
        authenticator.revoked.add("a")
        for ws in shared:
            await _until_closed(ws)
            assert ws.close_code == CREDENTIALS_ENDED
        assert not any(ws.closed for ws in others)
        await burst(session, server.url, 1, **{"X-API-Key": "b"})
        for ws in others:
            assert len(await frames(ws, 1)) == 1


async def test_shared_rechecks_still_come_when_the_proof_expires() -> None:
    """The check at a proof's expiry stays exact when streams share it: five streams of a
    key whose proof ends in 0.4 s are checked once then, not a minute later, and closed."""
    expires_at = time.time() + 0.4
    authenticator = _CountingKeys(c=expires_at)
    async with (
        running_gateway(authenticator=authenticator) as (_, server),
        aiohttp.ClientSession() as session,
        contextlib.AsyncExitStack() as stack,
    ):
        streams = await _open_streams(stack, session, server.url, "c", 5)
        opened = authenticator.asked["c"]
        for ws in streams:
            await _until_closed(ws)
            assert ws.close_code == CREDENTIALS_ENDED
        assert time.time() >= expires_at
        assert time.time() < expires_at + 1.5
        assert authenticator.asked["c"] - opened == 1
