"""Fuzz the gateway from its own OpenAPI document: bodies generated from each method's
request schema (hypothesis-jsonschema), arbitrary JSON and bytes, hostile headers. No
answer may be a 5xx but those a typed error maps to (a plugin's own error, a deadline)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from dispatcher.gateway import STATUS_BY_TYPE
from tests.gateway_support import running_gateway

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)
# Printable ASCII without surrounding blanks: what an HTTP client lets through (h11 refuses more).
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
    str.strip
)


def params_from(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values for ``schema``. hypothesis-jsonschema 0.23.1 draws objects through a private
    hypothesis API that hypothesis 6.1xx removed (``many.more``), so an object schema's
    properties are drawn one by one here, each with hypothesis-jsonschema, and combined;
    an object that ``additionalProperties: false`` forbids is drawn too (an extra key)."""
    properties = schema.get("properties")
    if schema.get("type") != "object" or not isinstance(properties, dict):
        return from_schema(schema)
    required = set(schema.get("required", ()))
    fields = {name: from_schema(sub) for name, sub in properties.items()}
    valid = st.fixed_dictionaries(
        {name: fields[name] for name in required},
        optional={name: fields[name] for name in fields if name not in required},
    )
    extra = st.dictionaries(
        st.text(max_size=8).filter(lambda key: key not in fields),
        json_values,
        min_size=1,
        max_size=2,
    )
    return valid | st.builds(lambda base, more: {**more, **base}, valid, extra)


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    """A gateway on its own loop in a thread, so hypothesis drives it with a plain client."""
    ready: list[str] = []
    stop = threading.Event()
    started = threading.Event()

    async def serve() -> None:
        async with running_gateway() as (_, server):
            ready.append(server.url)
            started.set()
            await asyncio.to_thread(stop.wait)

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    assert started.wait(30)
    try:
        yield ready[0]
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def document(gateway_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{gateway_url}/openapi.json").json())


@pytest.fixture(scope="module")
def client(gateway_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_url, timeout=30) as client:
        yield client


def check(response: httpx.Response) -> None:
    body = orjson.loads(response.content)
    if response.status_code >= 500:
        error_type = body["error"]["type"]
        plugins_own = error_type not in STATUS_BY_TYPE
        assert plugins_own or error_type == "deadline_exceeded", (response.status_code, body)
    if response.status_code != 200:
        assert body["ok"] is False
        assert isinstance(body["error"]["message"], str)


def operations(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path, item in document["paths"].items():
        if "post" in item:
            reference = item["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            found.append((path, document["components"]["schemas"][reference.rsplit("/", 1)[1]]))
    return found


_FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))


def test_bodies_from_each_methods_schema_never_get_an_untyped_5xx(
    document: dict[str, Any], client: httpx.Client
) -> None:
    def fuzz_one(path: str, schema: dict[str, Any]) -> None:
        @_FUZZ
        @given(params_from(schema))
        def fuzz(params: Any) -> None:
            headers = {"Content-Type": "application/json"}
            check(client.post(path, content=json.dumps(params).encode(), headers=headers))

        fuzz()

    for path, schema in operations(document):
        fuzz_one(path, schema)


def test_any_json_any_bytes_and_hostile_headers_never_get_an_untyped_5xx(
    document: dict[str, Any], client: httpx.Client
) -> None:
    paths = [path for path, _ in operations(document)]

    @_FUZZ
    # Found by a run: aiohttp's Content-Type parser raised IndexError on it (an untyped 500).
    @example("/v1/plugins/echo/methods/say", b"\x00", {"Content-Type": ";0*"})
    @given(
        st.sampled_from([*paths, "/v1/plugins/ghost/methods/x", "/v1/plugins/echo/methods/%00"]),
        json_values.map(lambda value: json.dumps(value).encode()) | st.binary(max_size=64),
        st.dictionaries(
            st.sampled_from(
                [
                    "X-Timeout-Ms",
                    "Request-Timeout",
                    "X-Plugin-Version",
                    "Idempotency-Key",
                    "traceparent",
                    "X-Request-Id",
                    "Content-Type",
                    "Authorization",
                ]
            ),
            header_text,
            max_size=4,
        ),
    )
    def fuzz(path: str, body: bytes, headers: dict[str, str]) -> None:
        headers.setdefault("Content-Type", "application/json")
        check(client.post(path, content=body, headers=headers))

    fuzz()
