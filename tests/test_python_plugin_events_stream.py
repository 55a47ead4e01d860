"""The Python SDK's gRPC ``Events`` stream for a host that does not read
(``linchkit_plugin._grpc_events``): the newest 1,024 events wait, the oldest dropped and said
once, in the words of every SDK and of the WebSocket sessions."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest

from linchkit_plugin._grpc_events import EVENTS_PER_STREAM, EventStreams


async def test_an_events_stream_keeps_the_newest_and_says_so_once_in_every_sdk_s_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    streams = EventStreams()
    streams.loop = asyncio.get_running_loop()
    queue = streams.open()
    emitted = 3 * EVENTS_PER_STREAM
    with caplog.at_level(logging.WARNING, "linchkit_plugin"):
        for seq in range(emitted):
            streams.emit("tick", {"seq": seq})
        await asyncio.sleep(0)  # the loop runs the offers emit scheduled
    kept: list[int] = []
    while not queue.empty():
        item = queue.get_nowait()
        assert item is not None
        kept.append(orjson.loads(item[1])["seq"])
    assert kept == list(range(emitted - EVENTS_PER_STREAM, emitted))
    warnings = [r.getMessage() for r in caplog.records if "not reading" in r.getMessage()]
    assert warnings == ["the host is not reading its Events stream; dropping the oldest events"]
