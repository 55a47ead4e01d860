"""Both clients of the HTTP seam (``client: aiohttp`` and ``client: reqwest``) behave alike.

The provider's other test files run on the default client; these run the hostile cases on
each client by name: a reset mid-call, a refused connection, an endless body, a slow
peer, a redirect, and the ``pool:`` that sizes a target's own connections. Real servers on
loopback; no timing assertion tighter than seconds.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest
import trustme

from dispatcher import (
    DeadlineExceeded,
    Dispatcher,
    ProviderError,
    ShuttingDown,
    TargetUnavailable,
)
from dispatcher.config import ManifestError
from tests.conftest import ROOT, echo_plugin, manifest
from tests.test_drain import established_to, until
from tests.test_http_hardening import Handler, read_head, replying, server_on
from tests.test_http_mtls import PluginServer, write, write_leaf

CLIENTS = ("aiohttp", "reqwest")
#: Why reqwest fails the tests of an abandoned call (providers._http_client.DEFAULT_CLIENT):
#: strict, so that a pyreqwest that aborts the call's task makes them pass and fail here.
DETACHED = pytest.mark.xfail(
    strict=True,
    reason="pyreqwest 0.15 detaches (does not abort) the task of a cancelled request: the"
    " connection stays open until the plugin answers or the request times out",
)
ABANDONING = ("aiohttp", pytest.param("reqwest", marks=DETACHED))
OK = b'{"ok": true, "result": {"text": "hi"}}'


def target(url: str, client: str, **extra: Any) -> dict[str, Any]:
    return {"provider": "http", "url": url, "client": client, **extra}


async def say(plugin_target: dict[str, Any], timeout_ms: int = 3000) -> Any:
    plugins = manifest(echo_plugin("p", plugin_target, defaults={"timeout_ms": timeout_ms}))
    async with Dispatcher(plugins) as dispatcher:
        return await dispatcher.call("p", "say", {"text": "hi"})


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_call_answers_on_either_client(client: str) -> None:
    async with server_on("127.0.0.1", replying(200, OK)) as (host, port):
        assert await say(target(f"http://{host}:{port}", client)) == {"text": "hi"}


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_redirect_is_refused_naming_where_it_points(client: str) -> None:
    handler = replying(302, b"", "Location: http://169.254.169.254/latest")
    async with server_on("127.0.0.1", handler) as (host, port):
        with pytest.raises(ProviderError) as caught:
            await say(target(f"http://{host}:{port}", client))
    assert "302" in caught.value.message
    assert "169.254.169.254" in caught.value.message


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_reset_after_the_request_is_typed_and_not_marked_as_never_sent(
    client: str,
) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.transport.abort()  # the request arrived; the answer never comes

    async with server_on("127.0.0.1", reset) as (host, port):
        with pytest.raises(TargetUnavailable) as caught:
            await say(target(f"http://{host}:{port}", client))
    # It may have reached the plugin: the fleet must not treat it as a refused connect.
    assert caught.value.details.get("stage") != "connect"
    assert caught.value.retryable


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_refused_connection_is_marked_as_never_sent(client: str) -> None:
    async with server_on("127.0.0.1", replying(200, OK)) as (host, port):
        pass  # closed: nothing listens on the port any more
    with pytest.raises(TargetUnavailable) as caught:
        await say(target(f"http://{host}:{port}", client))
    assert caught.value.details.get("stage") == "connect"


@pytest.mark.parametrize("client", CLIENTS)
async def test_an_endless_body_is_cut_at_max_response_bytes(client: str) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        try:
            while True:  # a peer that lies about nothing and never stops
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
        finally:
            writer.transport.abort()  # drop what is still buffered for the gone client

    async with server_on("127.0.0.1", endless) as (host, port):
        with pytest.raises(ProviderError) as caught:
            await say(target(f"http://{host}:{port}", client, max_response_bytes=1_000_000))
    assert "max_response_bytes=1000000" in caught.value.message


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_peer_that_never_answers_ends_at_the_deadline(client: str) -> None:
    hung_up = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await reader.read()  # never answers; returns when the client hangs up
        writer.close()
        await writer.wait_closed()
        hung_up.set()

    async with server_on("127.0.0.1", silent) as (host, port):
        plugin = target(f"http://{host}:{port}", client)
        plugins = manifest(echo_plugin("p", plugin, defaults={"timeout_ms": 300}))
        async with Dispatcher(plugins) as dispatcher:
            started = asyncio.get_running_loop().time()
            with pytest.raises(DeadlineExceeded):
                await dispatcher.call("p", "say", {"text": "hi"})
            assert asyncio.get_running_loop().time() - started < 10
            # The client hangs up on the call it gave up on (not only when it closes).
            await asyncio.wait_for(hung_up.wait(), timeout=10)


def counting(state: dict[str, int], release: asyncio.Event) -> Handler:
    """Answers every request once ``release`` is set; counts connections open at once."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state["open"] += 1
        state["most"] = max(state["most"], state["open"])
        try:
            while True:
                await read_head(reader)
                await release.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(OK), OK))
                await writer.drain()
        finally:
            state["open"] -= 1

    return handle


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_targets_pool_bounds_its_connections(client: str) -> None:
    state = {"open": 0, "most": 0}
    release = asyncio.Event()
    async with server_on("127.0.0.1", counting(state, release)) as (host, port):
        plugin = target(f"http://{host}:{port}", client, pool={"max_connections": 2})
        plugins = manifest(echo_plugin("p", plugin, defaults={"timeout_ms": 10000}))
        async with Dispatcher(plugins) as dispatcher:
            calls = [
                asyncio.create_task(dispatcher.call("p", "say", {"text": "hi"})) for _ in range(8)
            ]
            await asyncio.sleep(0.5)  # every call has had time to ask for a connection
            release.set()
            assert [await call for call in calls] == [{"text": "hi"}] * 8
    assert 1 <= state["most"] <= 2


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_call_that_finds_the_pool_full_waits_no_longer_than_its_deadline(
    client: str,
) -> None:
    """It ends as ``DeadlineExceeded``, and the pool serves the next call once the
    connection is free again (the waiter that left took no slot with it)."""
    state = {"open": 0, "most": 0}
    release = asyncio.Event()
    async with server_on("127.0.0.1", counting(state, release)) as (host, port):
        plugin = target(f"http://{host}:{port}", client, pool={"max_connections": 1})
        plugins = manifest(echo_plugin("p", plugin, defaults={"timeout_ms": 10_000}))
        async with Dispatcher(plugins) as dispatcher:
            holder = asyncio.create_task(dispatcher.call("p", "say", {"text": "hi"}))
            await until(lambda: state["open"] == 1)
            with pytest.raises(DeadlineExceeded):
                await dispatcher.call("p", "say", {"text": "hi"}, timeout=0.3)
            release.set()
            assert await holder == {"text": "hi"}
            assert await dispatcher.call("p", "say", {"text": "hi"}) == {"text": "hi"}
    assert state["most"] == 1


def first_held(state: dict[str, int]) -> Handler:
    """Holds the first request unanswered until the client hangs up; answers every later
    one at once. Counts connections open at once."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state["open"] += 1
        state["most"] = max(state["most"], state["open"])
        state["connections"] += 1
        first = state["connections"] == 1
        try:
            await read_head(reader)
            if first:
                await reader.read()  # b"" once the client closes the connection
                return
            while True:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(OK), OK))
                await writer.drain()
                await read_head(reader)
        finally:
            state["open"] -= 1

    return handle


async def test_a_cancelled_reqwest_call_keeps_its_connection_slot_until_its_request_ends() -> None:
    """pyreqwest lets the request of a cancelled call run on, its connection open, until
    the request's timeout: the pool's bound counts it until then, so cancelled calls (hedges
    that lost, callers that gave up) never open more connections than ``max_connections``."""
    state = {"open": 0, "most": 0, "connections": 0}
    async with server_on("127.0.0.1", first_held(state)) as (host, port):
        plugin = target(f"http://{host}:{port}", "reqwest", pool={"max_connections": 1})
        plugins = manifest(echo_plugin("p", plugin, defaults={"timeout_ms": 2000}))
        async with Dispatcher(plugins) as dispatcher:
            first = asyncio.create_task(dispatcher.call("p", "say", {"text": "hi"}))
            await until(lambda: state["open"] == 1)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            loop = asyncio.get_running_loop()
            cancelled_at = loop.time()
            second = await dispatcher.call("p", "say", {"text": "hi"}, timeout=10)
            waited = loop.time() - cancelled_at
    assert second == {"text": "hi"}
    assert waited >= 1.0, "the second call did not wait for the first one's request to end"
    assert state["connections"] == 2
    assert state["most"] == 1


@pytest.mark.parametrize(
    "pool",
    [
        {"max_connections": 0},
        {"max_connections": -1},
        {"idle_timeout_s": 0},
        {"max_per_host": "many"},
        {"max_connections": 10, "surprise": True},
    ],
)
def test_a_malformed_pool_is_refused_when_the_manifest_loads(pool: dict[str, Any]) -> None:
    with pytest.raises((ManifestError, ValueError)):
        manifest(echo_plugin("p", target("http://127.0.0.1:1", "aiohttp", pool=pool)))


@pytest.mark.parametrize(
    "plugin_target",
    [
        target("http://127.0.0.1:1", "reqwest"),
        {
            "provider": "knative",
            "service": "echo",
            "ingress": "http://127.0.0.1:1",
            "client": "reqwest",
        },
    ],
)
def test_client_reqwest_without_pyreqwest_is_refused_when_the_manifest_loads(
    plugin_target: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyreqwest", None)  # how Python marks a module absent
    with pytest.raises(ManifestError) as caught:
        manifest(echo_plugin("p", plugin_target))
    (problem,) = caught.value.problems
    assert problem.path.endswith("target.client"), problem
    assert "pip install 'linchkit-dispatcher[reqwest]'" in problem.message
    # Without pyreqwest every other target still loads: aiohttp is the default.
    manifest(
        echo_plugin("p", {key: value for key, value in plugin_target.items() if key != "client"})
    )


def test_an_unknown_client_is_refused_when_the_manifest_loads() -> None:
    with pytest.raises((ManifestError, ValueError)) as caught:
        manifest(echo_plugin("p", target("http://127.0.0.1:1", "curl")))
    assert "reqwest" in str(caught.value)


async def test_reqwest_leaves_no_thread_behind_that_grows_with_use() -> None:
    """pyreqwest's one runtime thread per process stays (it is shared, and idle); closing a
    dispatcher closes its clients, so opening and closing many adds no thread."""
    async with server_on("127.0.0.1", replying(200, OK)) as (host, port):
        url = f"http://{host}:{port}"
        await say(target(url, "reqwest", pool={"max_connections": 4}))
        before = len(os.listdir("/proc/self/task"))
        for _ in range(5):
            await say(target(url, "reqwest", pool={"max_connections": 4}))
        after = len(os.listdir("/proc/self/task"))
    assert after <= before


@pytest.fixture(scope="module")
def named_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An mTLS plugin server on 127.0.0.1 whose certificate names only plugin.internal."""
    folder = tmp_path_factory.mktemp("named")
    server_ca, client_ca = trustme.CA(), trustme.CA()
    cert, key = write_leaf(folder, "server", server_ca.issue_cert("plugin.internal"))
    client_cert, client_key = write_leaf(folder, "client", client_ca.issue_cert("host"))
    server = PluginServer(cert, key, write(folder, "client-ca.pem", client_ca.cert_pem.bytes()))
    tls = {
        "ca_file": str(write(folder, "ca.pem", server_ca.cert_pem.bytes())),
        "cert_file": str(client_cert),
        "key_file": str(client_key),
    }
    try:
        yield {"url": server.url, "tls": tls}
    finally:
        server.stop()


@pytest.mark.parametrize("client", CLIENTS)
async def test_server_name_is_what_the_certificate_is_checked_against(
    client: str, named_server: dict[str, Any]
) -> None:
    tls = {**named_server["tls"], "server_name": "plugin.internal"}
    assert (await say(target(named_server["url"], client, tls=tls)))["text"] == "hi"
    with pytest.raises(TargetUnavailable) as caught:  # the certificate does not name 127.0.0.1
        await say(target(named_server["url"], client, tls=named_server["tls"]))
    assert caught.value.details == {"stage": "connect", "tls": "server_certificate"}
    tls = {**named_server["tls"], "server_name": "intruder.internal"}
    with pytest.raises(TargetUnavailable):
        await say(target(named_server["url"], client, tls=tls))


# -- what the plugin learns when a call is abandoned, and what aclose leaves -------------


def holding(received: asyncio.Event, hung_up: asyncio.Event) -> Handler:
    """Reads one request and never answers; sets ``hung_up`` when the client hangs up."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        received.set()
        await reader.read()  # returns (b"") only when the client closes the connection
        hung_up.set()

    return hold


@pytest.mark.parametrize("client", ABANDONING)
async def test_a_cancelled_call_closes_its_connection_so_the_plugin_learns_it(
    client: str,
) -> None:
    """A hedge that lost or a caller that gave up: the plugin sees the disconnect at once,
    long before the call's own deadline (60 s here) could end it."""
    received, hung_up = asyncio.Event(), asyncio.Event()
    async with server_on("127.0.0.1", holding(received, hung_up)) as (host, port):
        plugin = target(f"http://{host}:{port}", client)
        plugins = manifest(echo_plugin("p", plugin, defaults={"timeout_ms": 60_000}))
        async with Dispatcher(plugins) as dispatcher:
            call = asyncio.create_task(dispatcher.call("p", "say", {"text": "hi"}))
            await asyncio.wait_for(received.wait(), timeout=10)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.wait_for(hung_up.wait(), timeout=5)


@pytest.mark.parametrize("client", ABANDONING)
async def test_aclose_closes_the_connection_of_a_call_the_drain_cut_off(client: str) -> None:
    received, hung_up = asyncio.Event(), asyncio.Event()
    async with server_on("127.0.0.1", holding(received, hung_up)) as (host, port):
        url = f"http://{host}:{port}"
        plugins = manifest(echo_plugin("p", target(url, client), defaults={"timeout_ms": 60_000}))
        dispatcher = Dispatcher(plugins)
        async with dispatcher:
            call = asyncio.create_task(dispatcher.call("p", "say", {"text": "hi"}))
            await asyncio.wait_for(received.wait(), timeout=10)
            await dispatcher.aclose(grace=0.1)
        with pytest.raises(ShuttingDown):
            await call
        await asyncio.wait_for(hung_up.wait(), timeout=5)
        assert established_to(url) == 0


@pytest.mark.parametrize("client", CLIENTS)
async def test_aclose_closes_the_idle_connections_of_the_pool(client: str) -> None:
    async with server_on("127.0.0.1", counting({"open": 0, "most": 0}, released())) as (
        host,
        port,
    ):
        url = f"http://{host}:{port}"
        async with Dispatcher(manifest(echo_plugin("p", target(url, client)))) as dispatcher:
            calls = [dispatcher.call("p", "say", {"text": "hi"}) for _ in range(6)]
            assert await asyncio.gather(*calls) == [{"text": "hi"}] * 6
            assert established_to(url) >= 1  # kept alive in the pool
        await until(lambda: established_to(url) == 0, timeout=10)


def released() -> asyncio.Event:
    release = asyncio.Event()
    release.set()
    return release


# -- a short-lived process exits cleanly ------------------------------------------------

#: A process that makes one call through the reqwest client, closes it and exits at once:
#: what a CLI command does. pyreqwest's thread finishing work that needs the GIL while
#: the interpreter finalizes aborted such a process (PyGILState_Release) in ~7% of runs.
SHORT_LIVED = textwrap.dedent(
    """
    import asyncio, sys
    from providers._http_client import HttpPool
    from providers._reqwest import ReqwestClient
    from providers.egress import EgressPolicy
    from providers.http import HttpTarget

    async def main(url):
        target = HttpTarget.model_validate({"provider": "http", "url": url})
        async with ReqwestClient(HttpPool(), egress=EgressPolicy()) as client:
            reply = await client.post(
                url + "/invoke", b"{}", {}, timeout=30, limit=1 << 20, target=target, tls=None
            )
        assert reply.status == 200, reply

    asyncio.run(main(sys.argv[1]))
    """
)
#: Runs of the process: at ~7% a run, 60 runs all pass by chance 1.3% of the time.
EXITS = 60


async def test_a_short_lived_process_that_used_reqwest_always_exits_cleanly() -> None:
    async with server_on("127.0.0.1", replying(200, OK)) as (host, port):
        url = f"http://{host}:{port}"
        slots = asyncio.Semaphore(2)  # two cores: one process each

        async def run() -> tuple[int | None, bytes]:
            async with slots:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    SHORT_LIVED,
                    url,
                    cwd=ROOT,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                )
                _, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
                return process.returncode, stderr

        outcomes = await asyncio.gather(*(run() for _ in range(EXITS)))
    failed = [(code, stderr[-300:]) for code, stderr in outcomes if code != 0]
    assert failed == [], f"{len(failed)} of {EXITS} runs failed: {failed[:2]}"


def test_reqwest_timeouts_round_up_to_the_millisecond_and_stay_few() -> None:
    """A request's timeout is never shorter than the call's time left (tokio's timers tick
    in milliseconds anyway), and the timeouts kept for reuse stay bounded."""
    from datetime import timedelta

    from providers import _reqwest

    assert _reqwest._timeout(0.0004) == timedelta(milliseconds=1)
    assert _reqwest._timeout(4.9991) == timedelta(milliseconds=5000)
    assert _reqwest._timeout(2.0) == timedelta(seconds=2)
    assert _reqwest._timeout(2.0) is _reqwest._timeout(2.0)
    for milliseconds in range(2 * _reqwest._MOST_TIMEOUTS):
        assert _reqwest._timeout(milliseconds / 1000 + 0.0001) >= timedelta(
            milliseconds=milliseconds
        )
    assert len(_reqwest._TIMEOUTS) <= _reqwest._MOST_TIMEOUTS


async def test_a_url_reqwest_cannot_parse_is_a_provider_error_not_a_value_error() -> None:
    """The manifest refuses such a URL (pydantic parses URLs as reqwest does); a host that
    builds the client itself still gets the seam's error, and no client is left built."""
    from providers._http_client import HttpPool
    from providers._reqwest import ReqwestClient
    from providers.egress import EgressPolicy
    from providers.http import HttpTarget

    target = HttpTarget.model_validate({"provider": "http", "url": "http://127.0.0.1:1"})
    async with ReqwestClient(HttpPool(), egress=EgressPolicy()) as client:
        for _ in range(2):
            with pytest.raises(ProviderError, match="reqwest cannot send to it"):
                await client.post(
                    "http://[::1%lo]:1/invoke",
                    b"{}",
                    {},
                    timeout=1,
                    limit=1024,
                    target=target,
                    tls=None,
                )
        assert "clients=0" in repr(client)


async def test_a_call_that_resolves_its_host_while_the_client_closes_leaves_no_client_open() -> (
    None
):
    """A first call to a name resolves it before it builds its pyreqwest client; a close
    that comes during the lookup found nothing to close, and the call then built a client
    (a pool, connections) nobody would close. It is refused instead, as after the close:
    as a call that went nowhere (a fleet may send it to another instance)."""
    from providers._http_client import HttpPool
    from providers._reqwest import ReqwestClient
    from providers.egress import EgressPolicy
    from providers.http import HttpTarget

    target = HttpTarget.model_validate({"provider": "http", "url": "http://localhost:1"})
    client = ReqwestClient(HttpPool(), egress=EgressPolicy())
    call = asyncio.create_task(
        client.post(
            "http://localhost:1/invoke", b"{}", {}, timeout=1, limit=1024, target=target, tls=None
        )
    )
    await asyncio.sleep(0)  # the call waits for the resolver
    await client.aclose()
    with pytest.raises(TargetUnavailable, match="closed") as caught:
        await call
    assert caught.value.details == {"stage": "connect"}  # nothing went out
    assert "clients=0" in repr(client)


async def test_a_call_that_resolves_its_host_while_its_url_is_forgotten_leaves_no_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same for a ``forget`` of the URL (its target's last detach): the client the
    call built after it stayed stored, open, for a URL no target calls any more, until
    the close. The call ends as one on a client closed under it before it was sent; a
    call that begins after the forget builds its client as any first call does."""
    from providers._http_client import HttpPool
    from providers._reqwest import ReqwestClient
    from providers.egress import EgressPolicy
    from providers.http import HttpTarget

    resolving = asyncio.Event()
    answer = asyncio.Event()

    async def slow_lookup(self: ReqwestClient, host: str, port: int, target: Any) -> list[str]:
        resolving.set()
        await answer.wait()
        return ["127.0.0.1"]

    monkeypatch.setattr(ReqwestClient, "_admitted", slow_lookup)
    async with server_on("127.0.0.1", replying(200, OK)) as (_, port):
        url = f"http://localhost:{port}/invoke"
        target = HttpTarget.model_validate({"provider": "http", "url": f"http://localhost:{port}"})
        async with ReqwestClient(HttpPool(), egress=EgressPolicy()) as client:

            def post() -> Awaitable[Any]:
                return client.post(url, b"{}", {}, timeout=5, limit=1024, target=target, tls=None)

            call = asyncio.create_task(post())
            await resolving.wait()
            await client.forget([url])
            answer.set()
            with pytest.raises(TargetUnavailable, match="closed") as caught:
                await call
            assert caught.value.details == {"stage": "connect"}
            assert client.urls_held() == frozenset()
            assert (await post()).status == 200  # a later call builds its own
            assert client.urls_held() == {url}
