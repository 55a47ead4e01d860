"""The gateway under the manifest's own ``auth``, ``access`` and ``audit``: a caller's API
key or JWT is checked by the dispatcher, the rules decide, and every request (refusals
included) leaves exactly one record in a chain ``dispatcher audit verify`` accepts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import grpc
import grpc.aio
import orjson
import pytest
from multidict import CIMultiDict

from dispatcher import Dispatcher
from dispatcher.audit import verify
from dispatcher.config import parse_manifest
from dispatcher.gateway import GatewayServer, GatewaySettings
from dispatcher.telemetry.logs import text_formatter
from linchkit_plugin._proto import gateway_pb2, gateway_pb2_grpc
from linchkit_plugin.errors import PluginNotFound
from tests.conftest import manifest
from tests.gateway_support import (
    echo_entry,
    eventful_entry,
    raw_connection,
    read_answer,
    running_gateway,
)
from tests.identity_support import good_claims, jwt_config, rsa_key, write_jwks

READER_KEY = "rk_live_reader_0123456789abcdef"
ADMIN_KEY = "rk_live_admin_fedcba9876543210"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def secured(tmp_path: Path, jwks_path: Path) -> Any:
    document = manifest(echo_entry()).model_dump(mode="json", exclude_none=True)
    return {
        **document,
        "auth": {
            "api_keys": [
                {"principal": "reader-svc", "sha256": sha256(READER_KEY), "roles": ["reader"]},
                {"principal": "admin-svc", "sha256": sha256(ADMIN_KEY), "roles": ["admin"]},
            ],
            "jwt": jwt_config(str(jwks_path)),
        },
        "access": {"roles": {"reader": {"allow": ["echo.say"]}, "admin": {"allow": ["*"]}}},
        "audit": {"path": str(tmp_path / "audit.log")},
    }


async def test_the_manifest_decides_who_calls_and_every_request_is_audited(
    tmp_path: Path,
) -> None:
    signing = rsa_key("k1")
    jwks_path = write_jwks(tmp_path / "jwks.json", signing)
    loaded = parse_manifest(secured(tmp_path, jwks_path), base_dir=tmp_path)
    settings = GatewaySettings(port=0)
    async with (
        Dispatcher(loaded) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
        aiohttp.ClientSession() as session,
    ):
        say = f"{server.url}/v1/plugins/echo/methods/say"
        withdraw = f"{server.url}/v1/plugins/echo/methods/withdraw"

        async def post(url: str, body: Any, **headers: str) -> tuple[int, Any]:
            async with session.post(url, json=body, headers=headers) as answer:
                return answer.status, await answer.json()

        status, body = await post(say, {"text": "hi"}, **{"X-API-Key": READER_KEY})
        assert (status, body["result"]["caller"]) == (200, "reader-svc")
        status, body = await post(withdraw, {"amount": 1}, **{"X-API-Key": READER_KEY})
        assert (status, body["error"]["type"]) == (403, "forbidden")
        status, body = await post(withdraw, {"amount": 1}, **{"X-API-Key": ADMIN_KEY})
        assert status == 200
        status, body = await post(say, {"text": "hi"}, **{"X-API-Key": "rk_live_guess"})
        assert (status, body["error"]["type"]) == (401, "unauthorized")
        status, body = await post(say, {"text": "hi"})
        assert status == 401
        token = signing.token(good_claims(sub="jwt-admin", roles=["admin"]))
        status, body = await post(withdraw, {"amount": 2}, Authorization=f"Bearer {token}")
        assert status == 200, body

    log = (tmp_path / "audit.log").read_text()
    records = [json.loads(line) for line in log.splitlines()]
    assert [(r["principal"] or {}).get("id") for r in records] == [
        "reader-svc",
        "reader-svc",
        "admin-svc",
        None,
        None,
        "jwt-admin",
    ]
    assert [r["outcome"] for r in records] == [
        "ok",
        "forbidden",
        "ok",
        "unauthorized",
        "unauthorized",
        "ok",
    ]
    for secret in (READER_KEY, ADMIN_KEY, token, "rk_live_guess"):
        assert secret not in log
    report = verify(tmp_path / "audit.log")
    assert report.intact, report


ALICE_KEY = "rk_live_alice_00112233445566778899"
BOB_KEY = "rk_live_bob_99887766554433221100"
CAROL_KEY = "rk_live_carol_aabbccddeeff00112233"


async def test_introspection_shows_a_caller_only_what_it_may_call_and_its_own_errors(
    tmp_path: Path,
) -> None:
    """Carol may call nothing: she was shown every plugin, method and params schema
    (/v1/plugins, /openapi.json) and the recent errors of everyone's calls (/v1/errors),
    whose messages carry what those callers sent. The docs promise a caller refused a
    name "learns nothing of what does exist"."""
    document = manifest(echo_entry(), eventful_entry()).model_dump(mode="json", exclude_none=True)
    document |= {
        "auth": {
            "api_keys": [
                {"principal": "alice", "sha256": sha256(ALICE_KEY), "roles": ["user"]},
                {"principal": "bob", "sha256": sha256(BOB_KEY), "roles": ["user"]},
                {"principal": "carol", "sha256": sha256(CAROL_KEY), "roles": []},
                {"principal": "admin-svc", "sha256": sha256(ADMIN_KEY), "roles": ["admin"]},
            ]
        },
        "access": {
            "roles": {"user": {"allow": ["echo.say", "echo.withdraw"]}, "admin": {"allow": ["*"]}}
        },
        "telemetry": {"metrics": {"enabled": True}},
    }
    loaded = parse_manifest(document, base_dir=tmp_path)
    async with (
        Dispatcher(loaded) as dispatcher,
        GatewayServer(dispatcher, GatewaySettings(port=0)) as server,
        aiohttp.ClientSession() as session,
    ):

        async def get(route: str, key: str | None) -> tuple[int, Any]:
            headers = {"X-API-Key": key} if key is not None else {}
            async with session.get(f"{server.url}{route}", headers=headers) as answer:
                return answer.status, await answer.json()

        withdraw = f"{server.url}/v1/plugins/echo/methods/withdraw"
        for key, amount in ((ALICE_KEY, 500), (BOB_KEY, 700)):
            async with session.post(
                withdraw, json={"amount": amount}, headers={"X-API-Key": key}
            ) as answer:
                assert answer.status == 500  # the plugin's error, its message names the amount

        for route in ("/v1/plugins", "/openapi.json", "/v1/errors"):
            assert (await get(route, None))[0] == 401, route

        # /v1/plugins: what each may call, nothing else.
        def listed(body: Any) -> dict[str, list[str]]:
            return {p["id"]: [m["name"] for m in p["methods"]] for p in body["plugins"]}

        assert listed((await get("/v1/plugins", CAROL_KEY))[1]) == {}
        assert listed((await get("/v1/plugins", ALICE_KEY))[1]) == {"echo": ["say", "withdraw"]}
        assert listed((await get("/v1/plugins", ADMIN_KEY))[1]) == {
            "echo": ["say", "sleep", "withdraw"],
            "events": ["burst"],
        }

        # /openapi.json: the paths and params schemas of those methods only.
        def described(body: Any) -> tuple[set[str], set[str]]:
            paths = {path for path in body["paths"] if path.startswith("/v1/plugins/")}
            schemas = {name for name in body["components"]["schemas"] if ".params" in name}
            return paths, schemas

        status, carol = await get("/openapi.json", CAROL_KEY)
        assert status == 200
        assert described(carol) == (set(), set())
        assert "/v1/plugins" in carol["paths"]  # the routes themselves are no secret
        assert described((await get("/openapi.json", ALICE_KEY))[1]) == (
            {"/v1/plugins/echo/methods/say", "/v1/plugins/echo/methods/withdraw"},
            {"echo.say.params", "echo.withdraw.params"},
        )
        assert len(described((await get("/openapi.json", ADMIN_KEY))[1])[0]) == 4

        # /v1/errors: each caller's own calls; counts of the plugins it may call.
        status, errors = await get("/v1/errors", CAROL_KEY)
        assert (status, errors["recent"], errors["counts"]) == (200, [], [])
        _, errors = await get("/v1/errors", ALICE_KEY)
        assert [entry["message"][:18] for entry in errors["recent"]] == ["cannot withdraw 50"]
        assert errors["recent"][0]["caller"] == "alice"
        assert errors["counts"] == [{"plugin": "echo", "type": "plugin_error", "count": 2}]
        _, errors = await get("/v1/errors", BOB_KEY)
        assert [entry["message"][:18] for entry in errors["recent"]] == ["cannot withdraw 70"]
        _, errors = await get("/v1/errors", ADMIN_KEY)
        assert errors["recent"] == []  # another's message, whatever the caller's roles
        assert errors["counts"] == [{"plugin": "echo", "type": "plugin_error", "count": 2}]
        # Nothing of this is a call: no check or refusal counted, no audit record.
        assert dispatcher.stats()["access"]["refusals"] == 0


def _dead_http_entry() -> dict[str, Any]:
    return {
        "id": "remote",
        "version": "1.0.0",
        "target": {"provider": "http", "url": f"http://127.0.0.1:{unused_port()}"},
        "methods": {"say": {}},
    }


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("detail", ["safe", "full"])
async def test_a_caller_is_not_told_where_the_plugin_runs_unless_the_gateway_says_full(
    detail: str, caplog: pytest.LogCaptureFixture
) -> None:
    entry = _dead_http_entry()
    address = entry["target"]["url"].removeprefix("http://")
    settings = GatewaySettings(port=0, error_detail=detail)
    async with (
        running_gateway(entry, settings=settings) as (_, server),
        aiohttp.ClientSession() as session,
    ):
        async with session.post(f"{server.url}/v1/plugins/remote/methods/say", json={}) as answer:
            body = await answer.json()
            request_id = answer.headers["X-Request-Id"]
            assert answer.status == 503
        async with session.get(f"{server.url}/v1/errors") as answer:
            recent = (await answer.json())["recent"]
    error = body["error"]
    assert error["type"] == "target_unavailable" and error["retryable"] is True
    assert error["details"] == {"stage": "connect"}  # whether it ran: the client acts on it
    if detail == "full":
        assert address in error["message"]
        return
    assert address not in error["message"] and address not in orjson.dumps(recent).decode()
    assert error["message"].startswith("remote.say: the plugin could not be reached")
    logged = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert len(logged) == 1 and address in logged[0]  # the operator has the detail


async def test_a_subscriber_receives_only_the_events_its_roles_allow(tmp_path: Path) -> None:
    listener_key, other_key = "lk_live_listener_0123456789", "lk_live_other_9876543210"
    document = manifest(echo_entry(), eventful_entry()).model_dump(mode="json", exclude_none=True)
    keys = [
        {"principal": "listener", "sha256": sha256(listener_key), "roles": ["listener"]},
        {"principal": "other", "sha256": sha256(other_key), "roles": ["other"]},
        {"principal": "admin-svc", "sha256": sha256(ADMIN_KEY), "roles": ["admin"]},
    ]
    roles = {
        "listener": {"allow": ["events.tick"]},
        "other": {"allow": ["echo.say"]},
        "admin": {"allow": ["*"]},
    }
    loaded = parse_manifest(
        {**document, "auth": {"api_keys": keys}, "access": {"roles": roles}}, base_dir=tmp_path
    )
    async with (
        Dispatcher(loaded) as dispatcher,
        GatewayServer(dispatcher, GatewaySettings(port=0)) as server,
        aiohttp.ClientSession() as session,
    ):
        events = f"{server.url}/v1/events?plugin=events"
        async with (
            session.ws_connect(events, headers={"X-API-Key": listener_key}) as listening,
            session.ws_connect(events, headers={"X-API-Key": other_key}) as other,
        ):
            async with asyncio.timeout(20):
                for ws in (listening, other):
                    assert (await ws.receive_json())["type"] == "subscribed"
            async with session.post(
                f"{server.url}/v1/plugins/events/methods/burst",
                json={"name": "tick", "count": 3},
                headers={"X-API-Key": ADMIN_KEY},
            ) as answer:
                assert answer.status == 200
            async with asyncio.timeout(20):
                got = [await listening.receive_json() for _ in range(3)]
            assert [frame["event"] for frame in got] == ["tick"] * 3
            with pytest.raises(TimeoutError):  # nothing reaches a caller not allowed it
                async with asyncio.timeout(1.0):
                    await other.receive_json()


async def test_a_subscriber_allowed_one_version_receives_only_that_versions_events(
    tmp_path: Path,
) -> None:
    """Two versions of one plugin at once, as in a rollout: a role naming one version's
    glob receives that version's events only; a role naming none receives both."""
    one_key, all_key = "lk_live_one_version_0123456789", "lk_live_all_versions_987654321"
    entries = [eventful_entry(), {**eventful_entry(), "version": "2.0.0"}]
    rollouts = [{"plugin": "events", "method": "burst", "from": "1.0.0", "to": "2.0.0"}]
    document = {"version": 1, "plugins": entries, "rollouts": rollouts}
    keys = [
        {"principal": "one", "sha256": sha256(one_key), "roles": ["one"]},
        {"principal": "all", "sha256": sha256(all_key), "roles": ["all"]},
        {"principal": "admin-svc", "sha256": sha256(ADMIN_KEY), "roles": ["admin"]},
    ]
    roles = {
        "one": {"allow": ["events@1.*.tick"]},
        "all": {"allow": ["events.tick"]},
        "admin": {"allow": ["*"]},
    }
    loaded = parse_manifest(
        {**document, "auth": {"api_keys": keys}, "access": {"roles": roles}}, base_dir=tmp_path
    )
    async with (
        Dispatcher(loaded) as dispatcher,
        GatewayServer(dispatcher, GatewaySettings(port=0)) as server,
        aiohttp.ClientSession() as session,
    ):
        events = f"{server.url}/v1/events?plugin=events"
        async with (
            session.ws_connect(events, headers={"X-API-Key": one_key}) as one,
            session.ws_connect(events, headers={"X-API-Key": all_key}) as everything,
        ):
            async with asyncio.timeout(20):
                for ws in (one, everything):
                    assert (await ws.receive_json())["type"] == "subscribed"
            # 2 ticks from 1.0.0, 3 from 2.0.0, then 1 from 1.0.0: what the first
            # subscriber gets before that last one is all it was ever sent of 2.0.0's.
            for version, count in (("1.0.0", 2), ("2.0.0", 3), ("1.0.0", 1)):
                async with session.post(
                    f"{server.url}/v1/plugins/events/methods/burst",
                    json={"name": "tick", "count": count},
                    headers={"X-API-Key": ADMIN_KEY, "X-Plugin-Version": version},
                ) as answer:
                    assert answer.status == 200, await answer.text()
            async with asyncio.timeout(20):
                got_one = [await one.receive_json() for _ in range(3)]
                got_all = [await everything.receive_json() for _ in range(6)]
    assert [(frame["version"], frame["data"]["n"]) for frame in got_one] == [
        ("1.0.0", 0),
        ("1.0.0", 1),
        ("1.0.0", 0),
    ]
    assert [frame["version"] for frame in got_all] == ["1.0.0"] * 2 + ["2.0.0"] * 3 + ["1.0.0"]
    assert [frame["id"] for frame in got_all] == [1, 2, 3, 4, 5, 6]
    assert [frame["id"] for frame in got_one] == [1, 2, 6]  # ids skip what it may not see


async def test_a_name_that_resolves_to_nothing_lists_nothing_the_callers_roles_deny(
    tmp_path: Path,
) -> None:
    """A role allowed everything but a few names (``*`` with a deny, ``billing.*`` but
    not ``billing.admin_*``) may call a name that does not exist. Before, the answer
    listed what does: every ``plugin@version`` of the manifest (the denied plugin's too)
    or every method of the plugin (the denied ones too), which ``GET /v1/plugins`` hides
    from it. Under ``access`` such an answer now lists nothing, for calls and publishes
    (a submission is checked by the same code); without ``access`` it still lists what
    exists."""
    ops_key = "lk_live_ops_0123456789abcdef0123"
    document = manifest(echo_entry(), {**echo_entry(), "id": "vault"}).model_dump(
        mode="json", exclude_none=True
    )
    loaded = parse_manifest(
        {
            **document,
            "auth": {
                "api_keys": [{"principal": "ops", "sha256": sha256(ops_key), "roles": ["ops"]}]
            },
            "access": {"roles": {"ops": {"allow": ["*"], "deny": ["vault.*", "echo.withdraw"]}}},
        },
        base_dir=tmp_path,
    )
    hidden = ("vault", "withdraw", "sleep", "1.0.0")
    async with (
        Dispatcher(loaded) as dispatcher,
        GatewayServer(dispatcher, GatewaySettings(port=0)) as server,
        aiohttp.ClientSession(headers={"X-API-Key": ops_key}) as session,
    ):
        for path, headers, kind in [
            ("nothing/methods/x", {}, "plugin_not_found"),
            ("echo/methods/nope", {}, "method_not_found"),
            ("Echo/methods/say", {}, "plugin_not_found"),
            ("echo/methods/say", {"X-Plugin-Version": "9.9.9"}, "plugin_not_found"),
            ("echo/methods/say", {"X-Plugin-Version": "9"}, "plugin_not_found"),
        ]:
            async with session.post(
                f"{server.url}/v1/plugins/{path}", json={"text": "x"}, headers=headers
            ) as answer:
                text = await answer.text()
                assert (answer.status, orjson.loads(text)["error"]["type"]) == (404, kind), text
            assert not [name for name in hidden if name in text], text
        async with session.get(f"{server.url}/v1/plugins") as answer:
            assert [plugin["id"] for plugin in (await answer.json())["plugins"]] == ["echo"]
        async with session.ws_connect(f"{server.url}/v1/events") as ws:
            await ws.send_json({"type": "publish", "plugin": "nothing", "event": "e", "ref": 1})
            async with asyncio.timeout(20):
                frame = await ws.receive_json()
            assert frame["error"]["type"] == "plugin_not_found", frame
            assert not [name for name in hidden if name in orjson.dumps(frame).decode()], frame
    async with Dispatcher(manifest(echo_entry())) as open_dispatcher:
        with pytest.raises(PluginNotFound, match=r"known: echo@1\.0\.0"):
            await open_dispatcher.call("nothing", "x")


async def test_names_a_caller_made_up_are_logged_on_one_line_and_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the dispatcher drains (or its audit log is behind) a call is refused before
    its names are resolved, and the gateway logs the refusal with the names the caller
    wrote. Before, a line break in one (``%0A`` in the path; any character in a gRPC
    field, unauthenticated) wrote a record of the caller's making into a text log, and a
    gRPC name of 200,000 characters was logged whole, twice, on every such call."""
    forged = "\n2026-12-05 09:00:00,000 ERROR dispatcher.audit: the audit log was deleted"
    settings = GatewaySettings(port=0, grpc_port=0)
    async with running_gateway(echo_entry(), settings=settings) as (dispatcher, server):
        assert server.grpc is not None
        await dispatcher.drain(1)
        caplog.set_level(logging.WARNING, logger="dispatcher.gateway")
        path = "/v1/plugins/x" + quote(forged, safe="") + "/methods/say"
        async with raw_connection(server.url) as (reader, writer):
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                "Content-Length: 2\r\n\r\n{}".encode()
            )
            status, _ = await read_answer(reader)
        assert status == 503
        async with grpc.aio.insecure_channel(server.grpc.address) as channel:
            gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
            # The long name first: names the manifest does not hold are logged sparingly
            # (the first and second of them, then ever fewer), and it must be one of those.
            for plugin, method in [("y" * 200_000 + forged, "say\r"), ("x" + forged, "say")]:
                call = gateway_pb2.GatewayCall(plugin=plugin, method=method, params_json=b"{}")
                with pytest.raises(grpc.aio.AioRpcError):
                    await gateway.Call(call)
    logged = [record for record in caplog.records if record.name.startswith("dispatcher.gateway")]
    assert len(logged) == 2, [record.getMessage()[:200] for record in logged]
    lines = [text_formatter().format(record) for record in logged]
    for line in lines:
        assert "\n" not in line and "\r" not in line, line[:300]
        assert "shutting_down" in line and len(line) < 5_000, line[:300]
    assert "yyyy" in lines[1], lines[1][:300]


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
async def test_a_credential_sent_twice_is_refused_whichever_comes_first(
    tmp_path: Path, lane: bool
) -> None:
    """Two ``X-API-Key`` or two ``Authorization`` headers, the first one good: refused 401
    (before, the first was taken and the second ignored, where a proxy in front may have
    judged the request by the other). One of each kind still counts as before."""
    signing = rsa_key("k1")
    jwks_path = write_jwks(tmp_path / "jwks.json", signing)
    loaded = parse_manifest(secured(tmp_path, jwks_path), base_dir=tmp_path)
    token = signing.token(good_claims(sub="jwt-admin", roles=["admin"]))
    async with (
        Dispatcher(loaded) as dispatcher,
        GatewayServer(dispatcher, GatewaySettings(port=0, call_lane=lane)) as server,
        aiohttp.ClientSession() as session,
    ):
        say = f"{server.url}/v1/plugins/echo/methods/say"

        async def status_of(*headers: tuple[str, str]) -> int:
            async with session.post(say, json={"text": "hi"}, headers=CIMultiDict(headers)) as got:
                return got.status

        assert await status_of(("X-API-Key", READER_KEY)) == 200
        assert await status_of(("X-API-Key", READER_KEY), ("X-API-Key", "rk_live_guess")) == 401
        assert await status_of(("X-API-Key", READER_KEY), ("X-API-Key", READER_KEY)) == 401
        bearer = f"Bearer {token}"
        assert await status_of(("Authorization", bearer)) == 200
        assert await status_of(("Authorization", bearer), ("Authorization", "Bearer x")) == 401
