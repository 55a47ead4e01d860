"""The knative provider against real plugin processes behind the local Knative stand-in.

Plugins run in the real Knative Functions Python runtime (func-python, CloudEvents) or as the
SDK's HTTP function (plain envelope), started on demand by ``dispatcher.testing.knative``,
which emulates the ingress (Host routing) and the activator (503 while activating, scale
to zero after idle). Nothing here sleeps for a fixed time to make a point: waits are polls
with generous limits, so a slow shared machine changes durations, not verdicts.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from dispatcher import (
    DeadlineExceeded,
    Dispatcher,
    MethodNotFound,
    PluginError,
    ProviderError,
    TargetUnavailable,
)
from dispatcher.testing.knative import KnativeStandIn, Revision
from providers.knative import Failure, KnativeProvider, classify_failure
from tests.conftest import bound_socket, manifest

PLUGINS = Path(__file__).parent / "plugins"
ENTRYPOINT = "ledger_plugin:LedgerPlugin"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def func_python_revision(name: str, **config: Any) -> Revision:
    """The ledger plugin in the Knative Functions Python runtime (CloudEvents)."""
    return Revision(
        name=name,
        command=[
            sys.executable,
            "-m",
            "linchkit_plugin.knative",
            ENTRYPOINT,
            "--path",
            str(PLUGINS),
            "--config",
            orjson.dumps(config).decode(),
        ],
        readiness_path="/health/readiness",
    )


def envelope_revision(name: str, **config: Any) -> Revision:
    """The ledger plugin as the SDK's HTTP function (plain JSON envelope)."""
    return Revision(
        name=name,
        command=[
            sys.executable,
            "-m",
            "linchkit_plugin.cli",
            "serve",
            ENTRYPOINT,
            "--path",
            str(PLUGINS),
            "--port",
            "{port}",
            "--config",
            orjson.dumps(config).decode(),
        ],
        readiness_path="/health",
    )


def ledger(plugin_id: str, target: dict[str, Any], **methods: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": plugin_id,
        "version": "1.0.0",
        "target": target,
        "defaults": {"timeout_ms": 30_000},
        "methods": {
            "whoami": {"idempotent": True},
            "charge": {},
            "crash": {},
            "crash_once": {"idempotent": True},
            "odd": {},
            "refund": {},  # in the manifest, not in the plugin: the plugin answers method_not_found
            **methods,
        },
    }


def knative(ingress: str, service: str, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "knative",
        "ingress": ingress,
        "service": service,
        "namespace": "plugins",
        **extra,
    }


@pytest.fixture
async def standin(tmp_path: Path) -> AsyncIterator[KnativeStandIn]:
    async with KnativeStandIn(log_dir=tmp_path) as cluster:
        yield cluster


async def test_routes_by_host_and_tag(standin: KnativeStandIn) -> None:
    stable = func_python_revision("ledger-00001", greeting="stable")
    canary = func_python_revision("ledger-00002", greeting="canary")
    other = func_python_revision("other-00001", greeting="other")
    standin.add_service("ledger", stable, namespace="plugins", tags={"canary": canary})
    standin.add_service("other", other, namespace="plugins")
    await asyncio.gather(*(standin.wait_ready(r) for r in (stable, canary, other)))
    plugins = manifest(
        ledger("main", knative(standin.url, "ledger")),
        ledger("canary", knative(standin.url, "ledger", tag="canary")),
        ledger("other", knative(standin.url, "other")),
        ledger("missing", knative(standin.url, "nobody")),
    )
    async with Dispatcher(plugins) as dispatcher:
        main = await dispatcher.call("main", "whoami")
        tagged = await dispatcher.call("canary", "whoami")
        elsewhere = await dispatcher.call("other", "whoami")
        with pytest.raises(ProviderError, match="404"):
            await dispatcher.call("missing", "whoami")
    assert (main["revision"], main["greeting"], main["service"]) == (
        "ledger-00001",
        "stable",
        "ledger",
    )
    assert (tagged["revision"], tagged["greeting"]) == ("ledger-00002", "canary")
    assert elsewhere["revision"] == "other-00001"
    assert len(stable.forwarded) == len(canary.forwarded) == len(other.forwarded) == 1


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_cloudevents_modes_reach_func_python(standin: KnativeStandIn, mode: str) -> None:
    revision = func_python_revision("ledger-00001")
    standin.add_service("ledger", revision, namespace="plugins")
    await standin.wait_ready(revision)
    plugins = manifest(ledger("ledger", knative(standin.url, "ledger", mode=mode)))
    async with Dispatcher(plugins) as dispatcher:
        answer = await dispatcher.call(
            "ledger", "whoami", request_id="req-ce-1", traceparent=TRACEPARENT
        )
        assert await dispatcher.call("ledger", "charge", {"amount": 5}) == {"charged": 5}
        with pytest.raises(PluginError) as refused:
            await dispatcher.call("ledger", "charge", {"amount": 500})
        with pytest.raises(MethodNotFound, match="refund"):
            await dispatcher.call("ledger", "refund", {"amount": 1})
        # A result JSON cannot carry is the call's own provider_error: func-python, left to
        # encode it, answered a 500, which the host took for a target down and retried.
        with pytest.raises(ProviderError, match=r"result is not JSON: .*not JSON serializable"):
            await dispatcher.call("ledger", "odd")
    assert answer["request_id"] == "req-ce-1"
    assert answer["traceparent"] == TRACEPARENT
    (sent,) = [request for request in revision.forwarded if request.request_id == "req-ce-1"]
    if mode == "binary":
        assert sent.headers["ce-type"] == "dev.linchkit.plugin.call.v1"
        assert sent.headers["ce-traceparent"] == TRACEPARENT  # distributed-tracing extension
        assert sent.headers["ce-subject"] == "ledger.whoami"
    else:
        assert sent.headers["content-type"].startswith("application/cloudevents+json")
        assert not any(name.startswith("ce-") for name in sent.headers)
    # The event id is the request id: what the stand-in saw on the wire is the CloudEvent's id.
    assert revision.times_forwarded("req-ce-1") == 1
    assert refused.value.remote_type == "InsufficientFunds"
    assert "balance is 100" in refused.value.message


async def test_plain_envelope_mode_reaches_the_sdk_server(standin: KnativeStandIn) -> None:
    revision = envelope_revision("ledger-00001", greeting="envelope")
    standin.add_service("ledger", revision, namespace="plugins")
    plugins = manifest(ledger("ledger", knative(standin.url, "ledger", mode="envelope")))
    async with Dispatcher(plugins) as dispatcher:
        answer = await dispatcher.call("ledger", "whoami", request_id="req-env-1")
        with pytest.raises(PluginError, match="balance is 100"):
            await dispatcher.call("ledger", "charge", {"amount": 500})
        health = await dispatcher.health()
    assert answer["greeting"] == "envelope"
    assert answer["revision"] == "ledger-00001"
    assert revision.times_forwarded("req-env-1") == 1
    assert [report.health.status for report in health] == ["serving"]


async def test_scale_from_zero_is_retried_and_counted_as_a_cold_start(
    standin: KnativeStandIn,
) -> None:
    revision = func_python_revision("ledger-00001")
    standin.add_service("ledger", revision, namespace="plugins")
    plugins = manifest(ledger("ledger", knative(standin.url, "ledger")))
    async with Dispatcher(plugins) as dispatcher:
        provider = dispatcher.providers["knative"]
        assert isinstance(provider, KnativeProvider)
        assert revision.state == "scaled_to_zero"
        # charge is not idempotent: the 503s while activating never reached the plugin, so
        # it is resent, and reaches the plugin exactly once.
        cold = await dispatcher.call("ledger", "charge", {"amount": 7}, request_id="cold-1")
        assert provider.stats.cold_starts == 1
        assert provider.stats.activation_retries >= 1
        warm = await dispatcher.call("ledger", "charge", {"amount": 8}, request_id="warm-1")
        assert provider.stats.cold_starts == 1
        (cold_starts,) = dispatcher.stats()["cold_starts"]["knative"].values()
        assert cold_starts["count"] == 1
        assert cold_starts["seconds"] > 0  # the activation it waited for
    assert (cold, warm) == ({"charged": 7}, {"charged": 8})
    assert revision.times_forwarded("cold-1") == 1
    assert revision.times_forwarded("warm-1") == 1
    assert revision.starts == 1


async def test_cold_starts_are_exported_as_metrics(standin: KnativeStandIn) -> None:
    from tests.test_telemetry import samples, scrape, telemetry_manifest, value

    revision = func_python_revision("ledger-00001")
    standin.add_service("ledger", revision, namespace="plugins")
    plugin = ledger("ledger", knative(standin.url, "ledger"))
    async with Dispatcher(telemetry_manifest({"metrics": {"enabled": True}}, plugin)) as d:
        await d.call("ledger", "charge", {"amount": 1})
        await d.call("ledger", "charge", {"amount": 2})
        found = samples(await scrape(d))
        (target,) = d.stats()["cold_starts"]["knative"]
    labels = {"provider": "knative", "target": target}
    assert value(found, "dispatcher_cold_starts_total", **labels) == 1
    assert value(found, "dispatcher_cold_start_wait_seconds_total", **labels) > 0


async def test_a_target_s_cold_starts_go_with_it(standin: KnativeStandIn) -> None:
    """Kept by target, as Docker's are by pool: once no plugin is attached to a target
    (a reload moved it, a fleet's DNS stopped naming its address), its history goes, and
    with it its series in /metrics. Else every ingress address that ever had a cold start
    stayed in ``stats()`` for the process's life."""
    revision = func_python_revision("ledger-00001")
    standin.add_service("ledger", revision, namespace="plugins")
    moved = standin.url.replace("127.0.0.1", "localhost")
    before = manifest(ledger("ledger", knative(standin.url, "ledger")))
    async with Dispatcher(before) as dispatcher:
        await dispatcher.call("ledger", "whoami")
        (gone,) = dispatcher.stats()["cold_starts"]["knative"]
        assert standin.url in gone
        await dispatcher.reload(manifest(ledger("ledger", knative(moved, "ledger"))))
        assert "knative" not in dispatcher.stats()["cold_starts"]
        await standin.scale_to_zero(revision)
        await dispatcher.call("ledger", "whoami")
        (now,) = dispatcher.stats()["cold_starts"]["knative"]
        assert moved in now
        provider = dispatcher.providers["knative"]
        assert isinstance(provider, KnativeProvider)
        assert provider.stats.cold_starts == 2  # the provider's own count is its history


async def test_concurrent_calls_during_a_cold_start_each_reach_the_plugin_once(
    standin: KnativeStandIn,
) -> None:
    revision = func_python_revision("ledger-00001")
    standin.add_service("ledger", revision, namespace="plugins")
    plugins = manifest(ledger("ledger", knative(standin.url, "ledger")))
    async with Dispatcher(plugins) as dispatcher:
        provider = dispatcher.providers["knative"]
        assert isinstance(provider, KnativeProvider)
        results = await asyncio.gather(
            *(
                dispatcher.call("ledger", "charge", {"amount": i}, request_id=f"burst-{i}")
                for i in range(12)
            )
        )
    assert results == [{"charged": i} for i in range(12)]
    assert revision.starts == 1
    assert all(revision.times_forwarded(f"burst-{i}") == 1 for i in range(12))
    assert provider.stats.cold_starts == 12  # every call paid for the same activation


async def test_idle_revision_scales_to_zero_and_the_next_call_is_cold_again(
    tmp_path: Path,
) -> None:
    async with KnativeStandIn(idle_seconds=1.5, log_dir=tmp_path) as standin:
        revision = func_python_revision("ledger-00001")
        standin.add_service("ledger", revision, namespace="plugins")
        target = knative(standin.url, "ledger", activation_backoff_max_ms=200)
        plugins = manifest(ledger("ledger", target))
        async with Dispatcher(plugins) as dispatcher:
            provider = dispatcher.providers["knative"]
            assert isinstance(provider, KnativeProvider)
            await dispatcher.call("ledger", "whoami")
            assert provider.stats.cold_starts == 1
            await standin.wait_scaled_to_zero(revision)
            await dispatcher.call("ledger", "whoami")
            assert provider.stats.cold_starts == 2
        assert revision.starts == 2


async def test_activation_longer_than_the_deadline_ends_in_deadline_exceeded(
    standin: KnativeStandIn,
) -> None:
    never_ready = Revision(
        name="stuck-00001",
        command=[sys.executable, "-c", "import time; time.sleep(120)"],
    )
    standin.add_service("stuck", never_ready, namespace="plugins")
    plugins = manifest(ledger("stuck", knative(standin.url, "stuck")))
    async with Dispatcher(plugins) as dispatcher:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="still activating") as expired:
            await dispatcher.call("stuck", "charge", {"amount": 1}, timeout=1.0)
        elapsed = time.monotonic() - started
    assert expired.value.details["attempts"] >= 2
    assert elapsed < 1.0 + 5  # gave up at the deadline, not after the backoff ran on
    assert never_ready.forwarded == []


async def test_non_idempotent_call_that_may_have_run_is_never_sent_twice(
    standin: KnativeStandIn,
) -> None:
    revision = func_python_revision("ledger-00001")
    standin.add_service("ledger", revision, namespace="plugins")
    await standin.wait_ready(revision)
    plugins = manifest(ledger("ledger", knative(standin.url, "ledger")))
    async with Dispatcher(plugins) as dispatcher:
        provider = dispatcher.providers["knative"]
        assert isinstance(provider, KnativeProvider)
        with pytest.raises(TargetUnavailable, match="not resent") as failed:
            await dispatcher.call("ledger", "crash", request_id="crash-1")
    # The 502 may have run the plugin: the provider raises it at once, retryable, and the
    # dispatcher does not resend it because 'crash' is not idempotent.
    assert failed.value.retryable
    assert failed.value.details["resent"] is False
    assert failed.value.details["stage"] == "forwarded"
    assert revision.times_forwarded("crash-1") == 1
    assert provider.stats.maybe_reached == 1
    assert provider.stats.activation_retries == 0


async def test_idempotent_call_is_resent_by_the_retry_policy_after_the_pod_failed(
    standin: KnativeStandIn, tmp_path: Path
) -> None:
    revision = func_python_revision("ledger-00001", marker=str(tmp_path / "crashed"))
    standin.add_service("ledger", revision, namespace="plugins")
    await standin.wait_ready(revision)
    # The provider never resends what may have reached the plugin; the manifest's retry
    # policy does, because the method is idempotent.
    retried = {"idempotent": True, "retry": {"attempts": 3, "initial_backoff_ms": 20}}
    plugins = manifest(ledger("ledger", knative(standin.url, "ledger"), crash_once=retried))
    async with Dispatcher(plugins) as dispatcher:
        provider = dispatcher.providers["knative"]
        assert isinstance(provider, KnativeProvider)
        answer = await dispatcher.call("ledger", "crash_once", request_id="once-1")
    assert answer == "survived"
    assert revision.times_forwarded("once-1") == 2  # the failed attempt, then the good one
    assert revision.starts == 2
    assert provider.stats.maybe_reached == 1  # the 502, handed to the retry policy


async def test_idempotent_call_without_a_retry_policy_is_not_resent(
    standin: KnativeStandIn, tmp_path: Path
) -> None:
    revision = func_python_revision("ledger-00001", marker=str(tmp_path / "crashed"))
    standin.add_service("ledger", revision, namespace="plugins")
    await standin.wait_ready(revision)
    plugins = manifest(ledger("ledger", knative(standin.url, "ledger")))
    async with Dispatcher(plugins) as dispatcher:
        with pytest.raises(TargetUnavailable, match="not resent") as failed:
            await dispatcher.call("ledger", "crash_once", request_id="once-1")
    assert failed.value.details == {"stage": "forwarded", "resent": False, "attempts": 1}
    assert revision.times_forwarded("once-1") == 1


async def test_health_uses_the_readiness_path(standin: KnativeStandIn) -> None:
    revision = func_python_revision("ledger-00001")
    standin.add_service("ledger", revision, namespace="plugins")
    plugins = manifest(ledger("ledger", knative(standin.url, "ledger")))
    async with Dispatcher(plugins) as dispatcher:
        asleep = await dispatcher.health()
        await standin.wait_ready(revision)
        awake = await dispatcher.health()
    assert asleep[0].health.status == "not_serving"
    assert "activating" in asleep[0].health.detail
    assert awake[0].health.status == "serving"
    # Once it serves, health asks what it serves: a function without /describe says nothing.
    assert [request.path for request in revision.forwarded] == ["/health/readiness", "/describe"]
    assert awake[0].missing_methods == ()


async def test_unreachable_ingress_is_target_unavailable_within_the_deadline() -> None:
    closed = bound_socket()  # bound, never listening: connections to it are refused
    port = closed.getsockname()[1]
    plugins = manifest(ledger("ledger", knative(f"http://127.0.0.1:{port}", "ledger")))
    try:
        async with Dispatcher(plugins) as dispatcher:
            provider = dispatcher.providers["knative"]
            assert isinstance(provider, KnativeProvider)
            # 2 s, not less: on a loaded 2-core machine a first call's 0.5 s once passed
            # before the provider was reached ("deadline passed before calling").
            with pytest.raises(DeadlineExceeded, match=r"could not be reached.*cannot connect"):
                await dispatcher.call("ledger", "charge", {"amount": 1}, timeout=2.0)
    finally:
        closed.close()
    assert provider.stats.cold_starts == 0


def test_failure_classification_table() -> None:
    platform_503 = {"content-type": "text/plain"}
    function_event = {"ce-specversion": "1.0", "content-type": "application/json"}
    assert classify_failure(connect_failed=True) is Failure.NOT_REACHED
    assert classify_failure(reset=True) is Failure.MAYBE_REACHED
    assert (
        classify_failure(status=503, headers=platform_503, body=b"activating")
        is Failure.NOT_REACHED
    )
    assert classify_failure(status=503, headers=function_event, body=b"{}") is Failure.FINAL
    envelope = b'{"ok": false, "error": {"type": "overloaded", "message": "busy"}}'
    assert classify_failure(status=503, headers={}, body=envelope) is Failure.FINAL
    assert classify_failure(status=502, headers={}, body=b"") is Failure.MAYBE_REACHED
    for status in (400, 404, 429, 500, 504):
        assert classify_failure(status=status, headers={}, body=b"") is Failure.FINAL


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_an_event_that_is_not_a_call_is_refused_with_400(
    standin: KnativeStandIn, mode: str
) -> None:
    """A broker or trigger wired to the wrong events must see them refused, not delivered."""
    revision = func_python_revision("ledger-00001")
    standin.add_service("ledger", revision, namespace="plugins")
    await standin.wait_ready(revision)
    attributes = {
        "specversion": "1.0",
        "type": "com.example.order.created",
        "source": "/orders",
        "id": "evt-1",
    }
    envelope = {"method": "whoami", "params": {}}
    if mode == "binary":
        headers = {f"ce-{name}": value for name, value in attributes.items()}
        headers["content-type"] = "application/json"
        body = orjson.dumps(envelope)
    else:
        headers = {"content-type": "application/cloudevents+json"}
        body = orjson.dumps({**attributes, "datacontenttype": "application/json", "data": envelope})
    async with httpx.AsyncClient(base_url=standin.url, timeout=30) as client:
        headers["host"] = "ledger.plugins.example.com"
        wrong_type = await client.post("/", content=body, headers=headers)
        if mode == "binary":
            headers["ce-type"] = "dev.linchkit.plugin.call.v1"
            headers["ce-id"] = "evt-2"
            not_an_envelope = await client.post("/", content=b'"just a string"', headers=headers)
            assert not_an_envelope.status_code == 400, not_an_envelope.text
    assert wrong_type.status_code == 400, wrong_type.text
    answer = orjson.loads(wrong_type.content)
    error = (answer["data"] if mode == "structured" else answer)["error"]
    assert error["type"] == "provider_error"
    assert "com.example.order.created" in error["message"]
