"""``encode_json`` against ``orjson.dumps`` itself: what refusing NaN and infinity costs.

orjson writes a non-finite float as ``null``, silently changing the call, so
``encode_json`` looks through a value for one whenever its JSON holds a ``null`` — which
every optional field left empty puts there. Measured in a tight loop (min of ``REPEATS``
rounds), against raw ``orjson.dumps`` of the same value in the same run:

* ``wire_records_10k_encode_us`` / ``wire_records_10k_orjson_us``: 10,000 small records,
  each with a ``null`` and a float (a page of query results);
  ``wire_records_10k_over_orjson_ratio`` the ratio;
* ``wire_small_encode_us`` / ``wire_small_orjson_us``: a three-field result with a ``null``
  (the example plugin's answer).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from bench._core import Options
from linchkit_plugin.wire import encode_json

GOALS: dict[str, Any] = {}
REPEATS = 7
RECORDS = [
    {"id": number, "name": "item", "parent": None, "tags": ["a", "b"], "score": 1.5}
    for number in range(10_000)
]
SMALL = {"text": "hi", "greeting": "hello", "caller": None}


def _us(encode: Callable[[Any], bytes], value: Any, times: int) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _ in range(times):
            encode(value)
        best = min(best, (time.perf_counter() - started) / times * 1e6)
    return best


async def run(options: Options) -> dict[str, float]:
    big_times, small_times = (5, 20_000) if options.quick else (30, 200_000)
    figures = {
        "wire_records_10k_encode_us": _us(encode_json, RECORDS, big_times),
        "wire_records_10k_orjson_us": _us(orjson.dumps, RECORDS, big_times),
        "wire_small_encode_us": _us(encode_json, SMALL, small_times),
        "wire_small_orjson_us": _us(orjson.dumps, SMALL, small_times),
    }
    figures["wire_records_10k_over_orjson_ratio"] = (
        figures["wire_records_10k_encode_us"] / figures["wire_records_10k_orjson_us"]
    )
    return figures
