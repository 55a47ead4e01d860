"""A string that is not valid Unicode in what a plugin sends, on every transport of the SDK.

A Python str can hold a lone surrogate (bytes decoded with ``errors="surrogateescape"``,
half of an emoji cut from UTF-16 text), which has no UTF-8 form and so no JSON one.
orjson refuses it; the SDK answered that call's ``provider_error`` in orjson's words
("str is not valid UTF-8: surrogates not allowed"), and an error whose message or type held
one could not be encoded at all; an event whose name held one ended the whole gRPC Events
stream. Now the words are every SDK's ("a string is not valid Unicode (a lone
surrogate)", docs/protocol.md), such an event is dropped with one warning, an error's
details holding one are left out, and its message and type go with U+FFFD in its place.

Real servers (``dispatcher-plugin serve``, HTTP and WebSocket, and the gRPC executable),
called by the dispatcher through its providers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Dispatcher, PluginError, ProviderError
from linchkit_plugin.errors import PluginError as RaisedPluginError
from linchkit_plugin.wire import encode_result, error_response
from tests.test_python_plugin_non_finite import WAIT, scores_manifest, scores_server

NOT_UNICODE = "the plugin's result is not JSON: a string is not valid Unicode (a lone surrogate)"

HALVES_PLUGIN = """
import sys

from linchkit_plugin import Plugin
from linchkit_plugin.errors import PluginError

LATIN_1 = b"caf\\xe9".decode("utf-8", errors="surrogateescape")  # 'caf\\udce9'


class Scores(Plugin):
    def ok(self):
        return {"text": "smile \\U0001f600 ünïcødé"}

    def value(self):
        return {"text": LATIN_1}

    async def key(self):
        return [{LATIN_1: 1}]

    async def chunks(self):
        yield {"i": 0}
        yield {"i": LATIN_1}

    def refuses(self):
        raise PluginError(
            "no " + LATIN_1, remote_type="Bad" + LATIN_1, details={"name": LATIN_1}
        )

    def raises(self):
        raise ValueError("cannot read " + LATIN_1)

    async def events(self):
        self.emit("bad", {"name": LATIN_1})
        self.emit("bad " + LATIN_1, 1)
        self.emit("good", {"x": 1})
        return True


if __name__ == "__main__":
    from linchkit_plugin.grpc_server import main

    sys.exit(main(Scores, plugin_id="scores", version="1.0.0", runtime="python"))
"""

METHODS = ("ok", "value", "key", "chunks", "refuses", "raises", "events")
MODES = ["http", "websocket", "grpc"]


def served(tmp_path: Path, mode: str) -> Any:
    return scores_server(tmp_path, mode, HALVES_PLUGIN)


def assert_not_unicode(error: ProviderError) -> None:
    assert str(error) == NOT_UNICODE, error
    assert not error.retryable


@pytest.mark.parametrize("mode", MODES)
async def test_a_result_holding_a_lone_surrogate_is_the_calls_provider_error(
    tmp_path: Path, mode: str
) -> None:
    async with (
        served(tmp_path, mode) as (target, _),
        Dispatcher(scores_manifest(target, METHODS)) as dispatcher,
    ):
        for method in ("value", "key"):
            with pytest.raises(ProviderError) as refused:
                await dispatcher.call("scores", method, {})
            assert_not_unicode(refused.value)
        assert await dispatcher.call("scores", "ok", {}) == {"text": "smile 😀 ünïcødé"}


@pytest.mark.parametrize("mode", MODES)
async def test_an_error_holding_one_is_sent_with_u_fffd_and_without_such_details(
    tmp_path: Path, mode: str
) -> None:
    """Refusing the error would hide it: its message and type go with U+FFFD in place of
    the lone surrogate, and details JSON cannot carry are left out (as a NaN's are)."""
    async with (
        served(tmp_path, mode) as (target, _),
        Dispatcher(scores_manifest(target, METHODS)) as dispatcher,
    ):
        with pytest.raises(PluginError) as refused:
            await dispatcher.call("scores", "refuses", {})
        assert (refused.value.remote_type, refused.value.message) == (
            "Badcaf\ufffd",
            "no caf\ufffd",
        )
        assert refused.value.details == {}
        with pytest.raises(PluginError) as raised:
            await dispatcher.call("scores", "raises", {})
        assert raised.value.remote_type == "ValueError"
        assert raised.value.message == "cannot read caf\ufffd"


@pytest.mark.parametrize("mode", ["websocket", "grpc"])
async def test_a_chunk_holding_one_ends_the_stream_with_a_provider_error(
    tmp_path: Path, mode: str
) -> None:
    async with (
        served(tmp_path, mode) as (target, _),
        Dispatcher(scores_manifest(target, METHODS)) as dispatcher,
    ):
        got: list[Any] = []

        async def read_the_stream() -> None:
            async for chunk in dispatcher.stream("scores", "chunks", {}):
                got.append(chunk)

        with pytest.raises(ProviderError) as refused:
            await read_the_stream()
        assert got == [{"i": 0}]
        assert_not_unicode(refused.value)


@pytest.mark.parametrize("mode", ["websocket", "grpc"])
async def test_an_event_holding_one_is_not_sent_and_said_once(tmp_path: Path, mode: str) -> None:
    async with (
        served(tmp_path, mode) as (target, stderr),
        Dispatcher(scores_manifest(target, METHODS)) as dispatcher,
    ):
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        dispatcher.on_event(lambda _plugin, _version, name, data: events.put_nowait((name, data)))
        await asyncio.sleep(0.5)  # the Events stream opens with the first route
        assert await dispatcher.call("scores", "events", {}) is True
        async with asyncio.timeout(WAIT):
            assert await events.get() == ("good", {"x": 1})
            data_line = await stderr.line_with("not sent: the data")
            name_line = await stderr.line_with("not sent: its name")
        expected = (
            "event 'bad' not sent: the data of event 'bad' is not JSON: a string is not valid"
            " Unicode (a lone surrogate)"
        )
        assert expected in data_line, data_line
        # A name with no UTF-8 form ended a gRPC Events stream (every later event with it).
        expected = (
            "event 'bad caf\\udce9' not sent: its name is not valid Unicode (a lone surrogate)"
        )
        assert expected in name_line, name_line
        assert events.empty()


def test_the_encoders_name_the_rule_and_keep_a_pair_of_surrogates_whole() -> None:
    with pytest.raises(ProviderError, match=r"^the plugin's result is not JSON: a string is not"):
        encode_result(["caf\udce9"])
    # An error: U+FFFD for a lone one; two that make a pair are the character they make.
    error = RaisedPluginError("x\udce9 \ud83d\ude00", remote_type="T\ud800")
    wire = error_response(error)["error"]
    assert (wire["type"], wire["message"]) == ("T\ufffd", "x\ufffd 😀")
    encode_result(error_response(error))  # JSON now
