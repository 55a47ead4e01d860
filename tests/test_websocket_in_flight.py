"""Which reply answers what a connection asked (``providers.websocket.in_flight``), without
a connection: each kind of reply against each kind of question."""

from __future__ import annotations

import pytest

from linchkit_plugin.errors import Overloaded
from providers.websocket.in_flight import STREAM_QUEUE, WATCH_PROBES_KEPT, InFlight

#: (what id 1 asked, the reply's kind) → whether the reply answers it.
ANSWERS = {
    ("call", "response"): True,
    ("call", "chunk"): False,
    ("call", "health"): False,
    ("stream", "response"): True,
    ("stream", "chunk"): True,
    ("stream", "health"): False,
    ("health probe", "response"): False,
    ("health probe", "chunk"): False,
    ("health probe", "health"): True,
    ("read watch probe", "response"): False,
    ("read watch probe", "chunk"): False,
    ("read watch probe", "health"): True,
}


@pytest.mark.parametrize(("asked", "kind"), list(ANSWERS))
async def test_a_reply_answers_its_id_only_if_its_kind_answers_what_the_id_asked(
    asked: str, kind: str
) -> None:
    in_flight = InFlight("test plugin", overflowed=lambda call_id: None)
    if asked == "call":
        in_flight.call(1)
    elif asked == "stream":
        in_flight.stream(1)
    elif asked == "health probe":
        in_flight.probe(1)
    else:
        in_flight.watch_probe(1)
    answered = in_flight.reply(kind, 1, {"type": kind, "id": 1, "response": None})
    assert answered is ANSWERS[asked, kind]
    # A call or a probe answered is no longer in flight; a reply of another kind leaves
    # what was asked waiting (a stream's reader lets go of it).
    still_asked = {"read watch probe": "health probe"}.get(asked, asked)
    if answered and asked != "stream":
        still_asked = None
    assert in_flight.asked(1) == still_asked
    assert not in_flight.reply(kind, 2, {"type": kind, "id": 2})  # not in flight
    assert in_flight.asked(2) is None


async def test_a_stream_whose_reader_falls_behind_ends_overloaded_and_is_cancelled() -> None:
    overflowed: list[int] = []
    in_flight = InFlight("test plugin", overflowed=overflowed.append)
    queue = in_flight.stream(7)
    for n in range(STREAM_QUEUE + 1):
        assert in_flight.reply("chunk", 7, {"type": "chunk", "id": 7, "data": n})
    assert overflowed == [7] and in_flight.asked(7) is None
    items = [queue.get_nowait() for _ in range(queue.qsize())]
    assert [item["data"] for item in items[:-1]] == list(range(STREAM_QUEUE))
    assert isinstance(items[-1], Overloaded)  # after every chunk it holds, not instead


async def test_the_end_of_the_connection_fails_everything_in_flight() -> None:
    in_flight = InFlight("test plugin", overflowed=lambda call_id: None)
    call, probe, queue = in_flight.call(1), in_flight.probe(2), in_flight.stream(3)
    in_flight.cut_off(lambda: ConnectionError("gone"))
    assert len(in_flight) == 0
    for future in (call, probe):
        assert isinstance(future.exception(), ConnectionError)
    assert isinstance(queue.get_nowait(), ConnectionError)


async def test_every_outstanding_read_watch_probe_is_answered_by_its_own_reply_once() -> None:
    """The watch sent probes 1 and 2 before either was answered. Before: only the last
    was remembered, and 1's answer read as a reply to nothing. Now each one's answer
    answers it, once, in whatever order; a plugin's ``error`` frame naming one (it could
    not use it) is an answer too."""
    in_flight = InFlight("test plugin", overflowed=lambda call_id: None)
    for probe_id in (1, 2, 3):
        in_flight.watch_probe(probe_id)
    assert in_flight.reply("health", 2, {"type": "health", "id": 2})
    assert in_flight.reply("health", 1, {"type": "health", "id": 1})
    assert not in_flight.reply("health", 1, {"type": "health", "id": 1})  # once
    assert in_flight.asked(1) is None and in_flight.asked(3) == "health probe"
    assert in_flight.fail(3, ConnectionError("no health here"))
    assert in_flight.asked(3) is None
    assert len(in_flight) == 0  # nobody waits on them: not calls in flight


async def test_a_plugin_that_never_answers_the_watch_costs_a_bounded_memory() -> None:
    in_flight = InFlight("test plugin", overflowed=lambda call_id: None)
    for probe_id in range(1, 10_001):
        in_flight.watch_probe(probe_id)
    kept = [n for n in range(1, 10_001) if in_flight.asked(n) is not None]
    assert kept == list(range(10_001 - WATCH_PROBES_KEPT, 10_001))
