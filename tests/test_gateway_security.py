"""The gateway under the manifest's own ``auth``, ``access`` and ``audit``: a caller's API
key or JWT is checked by the dispatcher, the rules decide, and every request (refusals
included) leaves exactly one record in a chain ``dispatcher audit verify`` accepts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import aiohttp

from dispatcher import Dispatcher
from dispatcher.audit import verify
from dispatcher.config import parse_manifest
from dispatcher.gateway import GatewayServer, GatewaySettings
from tests.conftest import manifest
from tests.gateway_support import echo_entry
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
