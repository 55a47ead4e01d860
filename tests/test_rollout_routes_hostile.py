"""The gateway's rollout routes (``GET /v1/rollouts``, ``POST /v1/rollouts/{plugin}/
{method}:pause|resume|abort``) under hostile callers: odd, percent-encoded, oversized,
unicode and unknown names, wrong verbs, no or wrong credentials, a body where none is
expected. Every answer is a typed JSON error (never a 500, never a traceback), a name
no manifest could hold is never echoed back, and nothing but a valid request steers."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from dispatcher import Dispatcher, parse_manifest
from dispatcher.gateway import GatewayServer, GatewaySettings
from tests.conftest import ROOT
from tests.test_rollout import rollout, version

ADMIN_KEY = "rk_rollout_admin_0123456789abcdef"
READER_KEY = "rk_rollout_reader_fedcba9876543210"
ADMIN = {"X-API-Key": ADMIN_KEY}
READER = {"X-API-Key": READER_KEY}
TYPES = {"invalid_params", "unauthorized", "forbidden", "method_not_found"}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def secured_manifest() -> Any:
    return parse_manifest(
        {
            "version": 1,
            "plugins": [version("1.0.0"), version("2.0.0")],
            "rollouts": [rollout(steps=[50, 100], interval_s=600)],
            "auth": {
                "api_keys": [
                    {"principal": "admin", "sha256": sha256(ADMIN_KEY), "roles": ["admin"]},
                    {"principal": "reader", "sha256": sha256(READER_KEY), "roles": ["reader"]},
                ]
            },
            "access": {"roles": {"admin": {"allow": ["*"]}, "reader": {"allow": ["other.*"]}}},
        },
        base_dir=ROOT,
    )


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[Dispatcher, str, aiohttp.ClientSession]]:
    settings = GatewaySettings(port=0, header_timeout=2.0, body_timeout=2.0)
    async with (
        Dispatcher(secured_manifest()) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
        aiohttp.ClientSession() as session,
    ):
        yield dispatcher, server.url, session


async def send(
    session: aiohttp.ClientSession,
    verb: str,
    url: str,
    headers: dict[str, str],
    body: bytes | None = None,
) -> tuple[int, dict[str, Any], Any]:
    async with session.request(verb, url, headers=headers, data=body) as answer:
        assert answer.content_type == "application/json", await answer.text()
        return answer.status, dict(answer.headers), await answer.json()


def assert_refused(status: int, body: Any, expected_status: int, expected_type: str) -> None:
    assert status == expected_status, body
    assert body["ok"] is False
    assert body["error"]["type"] == expected_type
    assert body["error"]["type"] in TYPES
    assert "Traceback" not in body["error"]["message"]


def status_of(dispatcher: Dispatcher) -> str:
    return str(dispatcher.stats()["rollouts"]["svc.answer"]["status"])


@pytest.mark.parametrize(
    ("path", "expected_status", "expected_type"),
    [
        # the verb is missing, empty or doubled
        ("svc/answer", 400, "invalid_params"),
        ("svc/answer:", 400, "invalid_params"),
        ("svc/answer:resume:pause", 400, "invalid_params"),
        ("svc/answer:explode", 400, "invalid_params"),
        ("svc/answer:" + "p" * 4000, 400, "invalid_params"),
        # names no manifest could hold
        ("svc/:pause", 400, "invalid_params"),
        ("svc%2Fx/answer:pause", 400, "invalid_params"),
        ("%00/answer:pause", 400, "invalid_params"),
        ("%ff%fe/answer:pause", 400, "invalid_params"),
        ("sv%C3%A9/an%E2%80%AEswer:pause", 400, "invalid_params"),
        ("svc/..:pause", 400, "invalid_params"),
        ("x" * 4000 + "/answer:pause", 400, "invalid_params"),
        ("svc/" + "m" * 4000 + ":pause", 400, "invalid_params"),
        ("svc/answer%0d%0aX-Injected:%20yes:pause", 400, "invalid_params"),
        # well-formed, but no such rollout (the admin may steer anything)
        ("svc/say:pause", 404, "method_not_found"),
        ("nope/answer:abort", 404, "method_not_found"),
        ("svc/answer.x:pause", 404, "method_not_found"),
    ],
)
async def test_odd_names_and_verbs_are_typed_refusals_that_steer_nothing(
    gateway: tuple[Dispatcher, str, aiohttp.ClientSession],
    path: str,
    expected_status: int,
    expected_type: str,
) -> None:
    dispatcher, url, session = gateway
    status, headers, body = await send(session, "POST", f"{url}/v1/rollouts/{path}", ADMIN)
    assert_refused(status, body, expected_status, expected_type)
    assert len(body["error"]["message"]) < 300  # an oversized name is never echoed back
    assert "X-Injected" not in headers
    assert status_of(dispatcher) == "running"


async def test_a_percent_encoded_colon_is_the_same_request(
    gateway: tuple[Dispatcher, str, aiohttp.ClientSession],
) -> None:
    dispatcher, url, session = gateway
    status, _, body = await send(session, "POST", f"{url}/v1/rollouts/svc/answer%3Apause", ADMIN)
    assert (status, body["rollout"]["status"]) == (200, "paused")
    assert status_of(dispatcher) == "paused"


@pytest.mark.parametrize(
    ("verb", "path", "allowed"),
    [
        ("GET", "/v1/rollouts/svc/answer:pause", "POST"),
        ("PUT", "/v1/rollouts/svc/answer:abort", "POST"),
        ("DELETE", "/v1/rollouts/svc/answer:abort", "POST"),
        ("PATCH", "/v1/rollouts/svc/answer:abort", "POST"),
        ("POST", "/v1/rollouts", "GET"),
        ("DELETE", "/v1/rollouts", "GET"),
    ],
)
async def test_a_wrong_verb_is_405_naming_the_right_one(
    gateway: tuple[Dispatcher, str, aiohttp.ClientSession], verb: str, path: str, allowed: str
) -> None:
    dispatcher, url, session = gateway
    status, headers, body = await send(session, verb, url + path, ADMIN)
    assert_refused(status, body, 405, "invalid_params")
    assert headers["Allow"] == allowed
    assert status_of(dispatcher) == "running"


async def test_paths_beside_the_routes_are_404(
    gateway: tuple[Dispatcher, str, aiohttp.ClientSession],
) -> None:
    _, url, session = gateway
    for path in ("/v1/rollouts/svc/answer:pause/extra", "/v1/rollouts/svc", "/v1/rollouts/"):
        status, _, body = await send(session, "POST", url + path, ADMIN)
        assert_refused(status, body, 404, "invalid_params")


@pytest.mark.parametrize(
    ("headers", "expected_status", "expected_type"),
    [
        ({}, 401, "unauthorized"),
        ({"X-API-Key": "rk_guess"}, 401, "unauthorized"),
        ({"Authorization": "Bearer not-a-jwt"}, 401, "unauthorized"),
        ({"X-API-Key": "x" * 7000}, 401, "unauthorized"),
        (READER, 403, "forbidden"),  # may not call svc.answer, so may not steer it
    ],
)
async def test_unauthenticated_and_unauthorized_callers_steer_nothing(
    gateway: tuple[Dispatcher, str, aiohttp.ClientSession],
    headers: dict[str, str],
    expected_status: int,
    expected_type: str,
) -> None:
    dispatcher, url, session = gateway
    for action in ("pause", "abort", "explode"):
        status, _, body = await send(
            session, "POST", f"{url}/v1/rollouts/svc/answer:{action}", headers
        )
        assert_refused(status, body, expected_status, expected_type)
        assert "x" * 100 not in body["error"]["message"]
    assert status_of(dispatcher) == "running"


async def test_a_caller_sees_only_the_rollouts_of_methods_it_may_call(
    gateway: tuple[Dispatcher, str, aiohttp.ClientSession],
) -> None:
    """The reader may call other.* only: the rollout of svc.answer (its counters, a
    shadow's recent differences) was listed to it all the same."""
    _, url, session = gateway
    status, _, body = await send(session, "GET", f"{url}/v1/rollouts", {})
    assert_refused(status, body, 401, "unauthorized")
    status, _, body = await send(session, "GET", f"{url}/v1/rollouts", READER)
    assert (status, body) == (200, {"rollouts": {}})
    status, _, body = await send(session, "GET", f"{url}/v1/rollouts", ADMIN)
    assert status == 200
    assert body["rollouts"]["svc.answer"]["status"] == "running"


@pytest.mark.parametrize("body", [b"{}", b'{"action": "abort"}', b"x" * (3 * 1024 * 1024)])
async def test_a_body_where_none_is_expected_is_refused_and_steers_nothing(
    gateway: tuple[Dispatcher, str, aiohttp.ClientSession], body: bytes
) -> None:
    dispatcher, url, session = gateway
    status, headers, answer = await send(
        session, "POST", f"{url}/v1/rollouts/svc/answer:pause", ADMIN, body
    )
    assert_refused(status, answer, 400, "invalid_params")
    assert headers.get("Connection", "").lower() == "close"  # the rest is not a request
    assert status_of(dispatcher) == "running"
    status, headers, answer = await send(session, "GET", f"{url}/v1/rollouts", ADMIN, body)
    assert_refused(status, answer, 400, "invalid_params")
    # An empty body is no body: what clients send with POST by default.
    status, _, answer = await send(
        session, "POST", f"{url}/v1/rollouts/svc/answer:pause", ADMIN, b""
    )
    assert (status, answer["rollout"]["status"]) == (200, "paused")


async def test_a_request_line_past_the_parsers_limit_is_a_431_without_a_traceback(
    gateway: tuple[Dispatcher, str, aiohttp.ClientSession],
) -> None:
    """aiohttp's own parser refuses a URL over 8190 bytes before any route runs: in the
    gateway's envelope (dispatcher.gateway.protocol), short, quoting none of it."""
    dispatcher, url, session = gateway
    async with session.post(f"{url}/v1/rollouts/{'x' * 9000}/answer:pause", headers=ADMIN) as r:
        text = await r.text()
    assert r.status == 431
    assert r.content_type == "application/json"
    assert "Traceback" not in text and len(text) < 1000
    assert "xxxx" not in text
    assert status_of(dispatcher) == "running"
