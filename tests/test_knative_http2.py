"""``http2: true`` on a knative target: HTTP/2 by prior knowledge to the ingress, each
request naming its service as ``:authority`` (what an ingress routes HTTP/2 by).

Against a real HTTP/2 server standing in for the ingress (hypercorn serving an ASGI app
that routes by the request's host, as Kourier or Istio do, and answers the envelope with
the HTTP version and the host it was asked for).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
import pytest

from dispatcher import Dispatcher, ProviderError, TargetUnavailable
from dispatcher.config import ManifestError, parse_manifest
from tests.conftest import ROOT
from tests.test_http2 import h2c_server

Scope = dict[str, Any]

#: The services behind the ingress, by the host that routes to them.
SERVICES = {"echo.default.example.com": "echo", "tagged-echo.default.example.com": "tagged"}


async def _ingress(scope: Scope, receive: Any, send: Any) -> None:
    """Routes by host: a known one answers ``say`` with the HTTP version, the host asked
    for and the service it reached; any other host is 404, as an ingress answers."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = dict(scope["headers"])
    host = headers.get(b"host", b"").decode()  # as written: a port, if any, stays on it
    service = SERVICES.get(host)
    if service is None:
        status, payload = 404, b"no such host"
    elif scope["path"] == "/health":
        status, payload = 200, b"ok"
    else:
        envelope = orjson.loads(body)
        status = 200
        result = {
            "http_version": scope["http_version"],
            "host": host,
            "service": service,
            "host_headers": sum(1 for name, _ in scope["headers"] if name == b"host"),
        }
        payload = orjson.dumps({"ok": True, "result": result, "method": envelope["method"]})
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": payload})


def ingress(*, http2: bool = True) -> contextlib.AbstractAsyncContextManager[str]:
    """hypercorn serving ``_ingress`` on loopback (HTTP/2 by prior knowledge and HTTP/1.1;
    HTTP/1.1 only when not ``http2``); its URL."""
    return h2c_server(app=_ingress, http2=http2)


def knative(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "knative",
        "service": "echo",
        "ingress": url,
        "mode": "envelope",
        "client": "reqwest",
        "http2": True,
        **extra,
    }


def manifest(*targets: dict[str, Any]) -> Any:
    return parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": f"p{index}",
                    "version": "1.0.0",
                    "target": target,
                    "defaults": {"timeout_ms": 5000},
                    "methods": {"say": {}},
                }
                for index, target in enumerate(targets)
            ],
        },
        base_dir=ROOT,
    )


async def test_calls_go_over_http2_naming_their_service() -> None:
    async with ingress() as url, Dispatcher(manifest(knative(url))) as dispatcher:
        answers = await asyncio.gather(*(dispatcher.call("p0", "say", {}) for _ in range(20)))
        health = await dispatcher.health()
    assert {answer["http_version"] for answer in answers} == {"2"}
    assert {answer["host"] for answer in answers} == {"echo.default.example.com"}
    assert {answer["host_headers"] for answer in answers} == {1}
    assert [each.health.status for each in health] == ["serving"]


async def test_two_services_behind_one_ingress_each_get_their_own_calls() -> None:
    targets = (knative("URL"), knative("URL", tag="tagged"))
    async with ingress() as url:
        routed = manifest(*({**target, "ingress": url} for target in targets))
        async with Dispatcher(routed) as dispatcher:
            first, second = await asyncio.gather(
                dispatcher.call("p0", "say", {}), dispatcher.call("p1", "say", {})
            )
    assert (first["service"], second["service"]) == ("echo", "tagged")
    assert first["http_version"] == second["http_version"] == "2"


async def test_an_ingress_that_speaks_only_http1_fails_the_call_at_once() -> None:
    async with ingress(http2=False) as url, Dispatcher(manifest(knative(url))) as dispatcher:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("p0", "say", {})
        assert loop.time() - started < 2.5  # not at the 5 s deadline


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"client": "aiohttp"}, "http2: true needs client: reqwest"),
        ({"client": None}, "http2: true needs client: reqwest"),
        (
            {
                "ingress": "https://127.0.0.1:8443",
                "tls": {"server_name": "ingress.example.com"},
            },
            "tls.server_name cannot name another",
        ),
    ],
)
def test_a_manifest_asking_http2_where_it_cannot_hold_is_refused(
    extra: dict[str, Any], words: str
) -> None:
    target = {**knative("http://127.0.0.1:9"), **extra}
    if target["client"] is None:
        del target["client"]
    with pytest.raises(ManifestError, match=words):
        manifest(target)


async def test_the_ingress_is_checked_against_the_egress_policy_and_the_service_never_resolved() -> (
    None
):
    # The service's host is only named (pinned to the ingress's addresses), never looked
    # up; the ingress's name is resolved and checked, and refused before anything is sent.
    async with ingress() as url:
        port = url.rsplit(":", 1)[1]
        document = {
            "version": 1,
            "egress": {"allow": ["10.0.0.0/8"]},
            "plugins": [
                {
                    "id": "p0",
                    "version": "1.0.0",
                    "target": knative(f"http://localhost:{port}"),
                    "methods": {"say": {}},
                }
            ],
        }
        async with Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher:
            with pytest.raises(ProviderError, match="egress"):
                await dispatcher.call("p0", "say", {})


async def test_a_host_header_of_the_manifest_does_not_contradict_the_authority() -> None:
    # On HTTP/1.1 the service's Host replaces one the manifest sets; on HTTP/2 the authority
    # carries the host, and the manifest's Host went beside it, naming another.
    target = knative("URL", headers={"Host": "other.default.example.com", "X-Team": "a"})
    async with ingress() as url, Dispatcher(manifest({**target, "ingress": url})) as dispatcher:
        answer = await dispatcher.call("p0", "say", {})
    assert (answer["host"], answer["host_headers"]) == ("echo.default.example.com", 1)
