"""``encode_json``: the bytes it returns hold the document and no more; and
``Invocation.request_json``, which writes the same bytes of an envelope without its dicts.

Every envelope a call sends, and every cache key, lives as long as the call or the entry:
10,000 calls in flight held 40 MB of orjson's spare buffer before ``encode_json`` copied
its output to size (``bench/bench_http_inflight.py``).
"""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import orjson
import pytest

from linchkit_plugin.errors import InvalidParams
from linchkit_plugin.wire import encode_json
from providers.invocation import Invocation

ENVELOPE = {
    "v": 1,
    "plugin": "bench",
    "method": "say",
    "params": {"text": "hi"},
    "context": {"request_id": "0123456789ab-1", "deadline_ms": 120_000},
}


@pytest.mark.parametrize("size", [0, 1_000, 100_000])
def test_the_bytes_hold_only_the_document(size: int) -> None:
    document = {**ENVELOPE, "params": {"text": "x" * size}}
    held = 50
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [encode_json(document) for _ in range(held)]
        per_document = (tracemalloc.get_traced_memory()[0] - before) / held
    finally:
        tracemalloc.stop()
    # The object's header and the list's slot besides the document: well under 2x
    # (orjson's own output held 4 KB for the 150-byte envelope, 9x for 100 KB).
    assert per_document < len(kept[0]) * 1.2 + 200


def test_the_encoding_is_orjson_s_exactly() -> None:
    assert encode_json(ENVELOPE) == orjson.dumps(ENVELOPE)
    sorted_keys = encode_json({"b": 1, "a": [2, {"d": 3, "c": 4}]}, sort_keys=True)
    assert sorted_keys == b'{"a":[2,{"c":4,"d":3}],"b":1}'
    assert type(encode_json(ENVELOPE)) is bytes


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_still_refused(value: float) -> None:
    with pytest.raises(InvalidParams, match="not a JSON number"):
        encode_json({"params": {"deep": [1, value]}})


def test_what_json_cannot_carry_is_still_refused() -> None:
    with pytest.raises(InvalidParams, match="JSON-serializable"):
        encode_json({"params": object()})


class _Record(dict[str, object]):
    pass


class _Rows(list[object]):
    pass


@pytest.mark.parametrize(
    "params",
    [
        {"deep": (1, {"tuple": (None, math.nan)})},
        _Record(subclass={"of": [None, math.inf]}),
        _Rows([None, {"list": _Rows([-math.inf])}]),
        [{"id": number, "parent": None, "score": 1.5} for number in range(1000)] + [math.nan],
    ],
    ids=["tuples", "dict-subclass", "list-subclass", "last-of-many"],
)
def test_a_non_finite_number_is_found_in_every_kind_of_container(params: object) -> None:
    with pytest.raises(InvalidParams, match="not a JSON number"):
        encode_json({"params": params})


def test_nulls_and_finite_floats_pass_the_check() -> None:
    rows = [{"id": number, "parent": None, "score": -0.0, "big": 1e300} for number in range(1000)]
    assert encode_json(rows) == orjson.dumps(rows)


# deadline_ms on the wire (docs/protocol.md: only a positive value bounds a call)


def test_a_call_with_under_a_millisecond_left_is_not_sent_as_having_no_deadline() -> None:
    from providers.invocation import Invocation

    now = 100.0
    invocation = Invocation("p", "1.0.0", "m", {}, deadline=now + 0.0004, request_id="r-1")
    # 0 would tell the plugin the call has no deadline at all.
    assert invocation.context_wire(now)["deadline_ms"] == 1
    assert invocation.context_wire(now - 1)["deadline_ms"] == 1000


@pytest.mark.parametrize(
    ("sent", "read"),
    [(5000, 5000), (1, 1), (0, None), (-5, None), (True, None), ("5000", None), (None, None)],
)
def test_a_plugin_reads_only_a_positive_integer_as_a_deadline(sent: object, read: object) -> None:
    from linchkit_plugin.wire import parse_request

    request = parse_request(
        {"v": 1, "method": "m", "params": None, "context": {"request_id": "r", "deadline_ms": sent}}
    )
    assert request.deadline_ms == read


# Invocation.request_json: the envelope's bytes without building its dicts


def _invocation(**fields: Any) -> Invocation:
    values: dict[str, Any] = {
        "plugin": "bench",
        "version": "1.0.0",
        "method": "say",
        "params": {"text": "hi"},
        "deadline": 100.0,
        "request_id": "0123456789ab-1",
        **fields,
    }
    return Invocation(**values)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"params": [1, "two", None, 3.5]},
        {"params": 'text \u2603 with "quotes" and \\ and \n'},
        {"params": {"nested": {"deep": [{"x": None}]}}},
        {"params": 7},
        {"request_id": 'a caller\'s "id" \u00e9\u2028'},
        {"caller": "alice"},
        {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        {"idempotency_key": "order-17"},
        {"plugin": "billing-v2", "method": "charge_card"},
        {"deadline": 100.0004},
        {"deadline": 50.0},
    ],
)
def test_the_request_bytes_are_the_envelope_encoded(fields: dict[str, Any]) -> None:
    invocation = _invocation(**fields)
    now = 95.0 if fields.get("deadline") != 100.0004 else 100.0
    assert invocation.request_json(now) == encode_json(invocation.request_wire(now))
    assert orjson.loads(invocation.request_json(now))["v"] == 1


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_the_request_bytes_refuse_a_non_finite_number(value: float) -> None:
    invocation = _invocation(params={"x": [1, {"y": value}]})
    with pytest.raises(InvalidParams, match="not a JSON number"):
        invocation.request_json(95.0)


def test_the_request_bytes_refuse_what_json_cannot_carry() -> None:
    for invocation in (
        _invocation(params={"x": object()}),
        _invocation(params={"x": "\ud800"}),
        _invocation(request_id="\ud800"),
    ):
        with pytest.raises(InvalidParams, match="JSON-serializable"):
            invocation.request_json(95.0)
