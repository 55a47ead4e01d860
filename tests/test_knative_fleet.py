"""Knative fleets: one service behind several ingress gateways, against the local stand-in.

Each ``KnativeStandIn`` (``dispatcher.testing.knative``) is one ingress with its own
revision of the ledger plugin (the SDK's HTTP function), so the revision's name says which
ingress carried a call. An ingress that is down refuses connections; the fleet must send
the call to the other one at once, for any method. Assertions are on counts only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Dispatcher, DispatchError, ManifestError, TargetUnavailable
from dispatcher.testing.knative import KnativeStandIn
from providers.knative import KnativeProvider
from tests.conftest import bound_socket, manifest
from tests.test_knative import envelope_revision, ledger


def knative_fleet(ingresses: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "provider": "knative",
        "service": "ledger",
        "namespace": "plugins",
        "mode": "envelope",
        "instances": [{"url": url} for url in ingresses],
        **extra,
    }


@pytest.fixture
async def two_ingresses(tmp_path: Path) -> AsyncIterator[list[KnativeStandIn]]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        KnativeStandIn(log_dir=tmp_path / "a") as first,
        KnativeStandIn(log_dir=tmp_path / "b") as second,
    ):
        for name, standin in (("ledger-a", first), ("ledger-b", second)):
            revision = envelope_revision(name, greeting=name)
            standin.add_service("ledger", revision, namespace="plugins")
        yield [first, second]


async def call_many(
    dispatcher: Dispatcher, method: str, params: dict[str, Any], calls: int
) -> list[Any]:
    results: list[Any] = []
    for _ in range(calls):
        try:
            results.append(await dispatcher.call("ledger", method, params))
        except DispatchError as error:
            results.append(error)
    return results


# -- the manifest ----------------------------------------------------------------------


def test_a_knative_target_lists_ingresses_instead_of_or_besides_its_ingress() -> None:
    target = (
        manifest(
            ledger(
                "ledger",
                knative_fleet(["http://127.0.0.3:2"], ingress="http://127.0.0.2:1"),
            )
        )
        .plugins[0]
        .target
    )
    assert [str(each.ingress) for each in target.instance_targets()] == [
        "http://127.0.0.2:1/",
        "http://127.0.0.3:2/",
    ]
    assert target.describe() == (
        "knative ledger.plugins.example.com via fleet [http://127.0.0.2:1, http://127.0.0.3:2]"
        " (envelope)"
    )
    assert [d.field for d in target.destinations()] == ["ingress", "instances[0].url"]
    assert all(each.in_fleet for each in target.instance_targets())
    plain = (
        manifest(
            ledger(
                "ledger",
                {
                    "provider": "knative",
                    "service": "ledger",
                    "namespace": "plugins",
                    "mode": "envelope",
                    "ingress": "http://127.0.0.3:2",
                },
            )
        )
        .plugins[0]
        .target
    )
    assert target.instance_targets()[1].key == plain.key  # one pool and breaker with it
    assert not plain.in_fleet
    # A list of one is no fleet: its ingress is waited for like a plain target's.
    (alone,) = (
        manifest(ledger("ledger", knative_fleet(["http://127.0.0.3:2"])))
        .plugins[0]
        .target.instance_targets()
    )
    assert not alone.in_fleet


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ({"instances": []}, "needs an ingress or a list of instances"),
        (
            {"ingress": "http://127.0.0.2:1", "instances": [{"url": "http://127.0.0.2:1"}]},
            "listed twice",
        ),
        (
            {
                "instances": [{"url": "http://u:secret@127.0.0.2:1"}],
                "headers": {"Authorization": "Bearer x"},
            },
            "credentials twice",
        ),
        ({"instances": [{"address": "127.0.0.2:1"}]}, "instances.0.fixed.url"),
    ],
)
def test_bad_knative_fleets_are_refused(target: dict[str, Any], expected: str) -> None:
    with pytest.raises(ManifestError) as caught:
        manifest(ledger("ledger", {"provider": "knative", "service": "ledger", **target}))
    assert expected in str(caught.value).replace("[", ".").replace("]", "")
    assert "secret" not in str(caught.value)


# -- through the dispatcher ------------------------------------------------------------------


async def test_calls_spread_over_the_ingresses_and_move_off_one_that_goes_down(
    two_ingresses: list[KnativeStandIn],
) -> None:
    first, second = two_ingresses
    target = knative_fleet([first.url, second.url], balance="round_robin")
    async with Dispatcher(manifest(ledger("ledger", target))) as dispatcher:
        provider = dispatcher.providers["knative"]
        assert isinstance(provider, KnativeProvider)
        spread = await call_many(dispatcher, "whoami", {}, 10)  # both revisions start
        resent_before = provider.stats.activation_retries
        await first.aclose()  # this ingress is gone: its port refuses connections
        after = await call_many(dispatcher, "charge", {"amount": 1}, 20)  # not idempotent
        assert dispatcher.fleets is not None
        (fleet,) = dispatcher.fleets.fleets.values()
    assert sorted(answer["revision"] for answer in spread) == ["ledger-a"] * 5 + ["ledger-b"] * 5
    assert after == [{"charged": 1}] * 20  # none failed
    assert fleet.failovers > 0
    # A down ingress is not waited for: no resend after the close.
    assert provider.stats.activation_retries == resent_before


async def test_a_fleet_of_dead_ingresses_fails_fast_with_the_connect_error() -> None:
    closed = [bound_socket(), bound_socket()]  # bound, never listening: refused
    urls = [f"http://127.0.0.1:{sock.getsockname()[1]}" for sock in closed]
    try:
        async with Dispatcher(manifest(ledger("ledger", knative_fleet(urls)))) as dispatcher:
            with pytest.raises(TargetUnavailable) as caught:
                await dispatcher.call("ledger", "charge", {"amount": 1}, timeout=30)
            provider = dispatcher.providers["knative"]
            assert isinstance(provider, KnativeProvider)
            assert provider.stats.activation_retries == 0
    finally:
        for sock in closed:
            sock.close()
    assert caught.value.details.get("stage") == "connect"
    assert "cannot connect to the ingress" in caught.value.message


async def test_health_reports_every_ingress(two_ingresses: list[KnativeStandIn]) -> None:
    first, second = two_ingresses
    await asyncio.gather(
        *(
            standin.wait_ready(revision)
            for standin in two_ingresses
            for revision in standin._revisions
        )
    )
    async with Dispatcher(
        manifest(ledger("ledger", knative_fleet([first.url, second.url])))
    ) as dispatcher:
        reports = await dispatcher.health()
    assert [r.health.status for r in reports] == ["serving", "serving"]
    assert [r.target.split(" via ")[1] for r in reports] == [
        f"{first.url} (envelope)",
        f"{second.url} (envelope)",
    ]
    assert {r.fleet for r in reports} == {
        f"knative ledger.plugins.example.com via fleet [{first.url}, {second.url}] (envelope)"
    }
