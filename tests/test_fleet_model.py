"""The fleet's decisions, synchronously: outlier ejection, probes, picking (a fake clock)."""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any

import pytest

from dispatcher.fleet import (
    Fleet,
    InstanceState,
    LeastRequest,
    OutlierDetector,
    RoundRobin,
    Weighted,
)
from dispatcher.fleet.instances import Instance
from dispatcher.fleet.sources.health import ReadHealth
from providers.discovery import InstanceSource
from providers.http import HttpProvider, HttpTarget
from providers.target import FleetSettings, HealthCheck, OutlierDetection


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def detector(clock: FakeClock, size: int = 4, **overrides: Any) -> OutlierDetector:
    settings: dict[str, Any] = {
        "consecutive_failures": 3,
        "base_ejection": 10.0,
        "max_ejection": 35.0,
        "max_ejected_percent": 50,
        **overrides,
    }
    return OutlierDetector("fleet", size, clock=clock, **settings)


def test_an_instance_is_ejected_at_exactly_the_consecutive_failure_threshold() -> None:
    clock = FakeClock()
    outliers = detector(clock)
    assert [outliers.record_failure(0) for _ in range(2)] == [False, False]
    assert not outliers.is_ejected(0)
    assert outliers.record_failure(0) is True
    assert outliers.is_ejected(0)
    assert outliers.ejected == 1


def test_a_success_resets_the_count_and_a_plugin_error_is_not_counted_at_all() -> None:
    clock = FakeClock()
    outliers = detector(clock)
    for _ in range(10):
        outliers.record_failure(1)
        outliers.record_failure(1)
        outliers.record_success(1)  # the step records a plugin's own error as a success
    assert not outliers.is_ejected(1)
    assert outliers.total_ejections == 0


def test_the_ejection_ends_by_itself_and_grows_with_each_ejection_up_to_the_maximum() -> None:
    clock = FakeClock()
    outliers = detector(clock)
    lengths = []
    for _ in range(5):
        for _ in range(3):
            outliers.record_failure(2)
        started = clock.now
        while outliers.is_ejected(2):
            clock.advance(1)
        lengths.append(clock.now - started)
    assert lengths == [10, 20, 30, 35, 35]
    assert outliers.ejected == 0


def test_the_ejection_count_decays_while_the_instance_stays_in_service() -> None:
    clock = FakeClock()
    outliers = detector(clock)
    for _ in range(2):  # ejected twice: the next would last 30 s
        for _ in range(3):
            outliers.record_failure(0)
        clock.advance(outliers.ejection_left(0))
        assert not outliers.is_ejected(0)
    clock.advance(25)  # two base periods in service: back to the first ejection's length
    for _ in range(3):
        outliers.record_failure(0)
    assert outliers.ejection_left(0) == pytest.approx(10)


def test_never_more_than_max_ejected_percent_are_ejected() -> None:
    clock = FakeClock()
    outliers = detector(clock, size=3, max_ejected_percent=50)  # 3 x 50 % → 1
    for _ in range(10):
        outliers.record_failure(0)
        outliers.record_failure(1)
    assert [outliers.is_ejected(index) for index in range(3)] == [True, False, False]
    assert outliers.ejected == 1
    clock.advance(10)  # the first comes back: now the second may go
    outliers.record_failure(1)
    assert [outliers.is_ejected(index) for index in range(3)] == [False, True, False]


@pytest.mark.parametrize(
    ("size", "percent", "allowed"), [(2, 50, 1), (3, 50, 1), (4, 50, 2), (10, 10, 1), (3, 1, 1)]
)
def test_the_limit_is_a_share_rounded_down_but_at_least_one(
    size: int, percent: int, allowed: int
) -> None:
    assert detector(FakeClock(), size=size, max_ejected_percent=percent).max_ejected == allowed


def test_zero_percent_turns_ejection_off() -> None:
    outliers = detector(FakeClock(), max_ejected_percent=0)
    for _ in range(10):
        outliers.record_failure(0)
    assert not outliers.is_ejected(0)


def test_outcomes_of_calls_sent_before_the_ejection_do_not_extend_it() -> None:
    clock = FakeClock()
    outliers = detector(clock)
    for _ in range(3):
        outliers.record_failure(0)
    left = outliers.ejection_left(0)
    for _ in range(10):
        assert outliers.record_failure(0) is False
    assert outliers.ejection_left(0) == left
    assert outliers.total_ejections == 1


def test_release_puts_an_instance_back_at_once() -> None:
    clock = FakeClock()
    outliers = detector(clock)
    for _ in range(3):
        outliers.record_failure(3)
    outliers.release(3)
    outliers.release(3)  # twice is harmless
    assert not outliers.is_ejected(3)
    assert outliers.ejected == 0


# -- the fleet: states, probes, picking ------------------------------------------------


def fleet_of(size: int, clock: FakeClock, **settings: Any) -> Fleet:
    target = HttpTarget(
        provider="http",
        instances=[{"url": f"http://127.0.0.{index + 2}:8080"} for index in range(size)],  # type: ignore[misc]
    )
    fleet_settings = FleetSettings(**settings) if settings else None
    return Fleet(target, target.instance_targets(), HttpProvider(), clock, fleet_settings)


def test_probes_mark_an_instance_down_and_back_and_end_its_ejection() -> None:
    clock = FakeClock()
    fleet = fleet_of(3, clock, outlier=OutlierDetection(consecutive_failures=1))
    check = HealthCheck(unhealthy_after=2, healthy_after=3)
    one = fleet.instances[1]
    fleet.record_probe(one, False, check.unhealthy_after, check.healthy_after)
    assert fleet.state_of(one) is InstanceState.HEALTHY
    fleet.record_probe(one, False, check.unhealthy_after, check.healthy_after)
    assert fleet.state_of(one) is InstanceState.DOWN
    fleet.record_failure(one)  # ejected as well: still shown down
    assert fleet.state_of(one) is InstanceState.DOWN
    for _ in range(2):
        fleet.record_probe(one, True, check.unhealthy_after, check.healthy_after)
    assert fleet.state_of(one) is InstanceState.DOWN
    fleet.record_probe(one, True, check.unhealthy_after, check.healthy_after)
    assert fleet.state_of(one) is InstanceState.HEALTHY
    assert fleet.down == 0
    assert fleet.outliers.ejected == 0


def test_an_ejection_needs_healthy_after_probes_that_came_after_it() -> None:
    clock = FakeClock()
    fleet = fleet_of(3, clock, outlier=OutlierDetection(consecutive_failures=1))
    one = fleet.instances[0]
    for _ in range(5):
        fleet.record_probe(one, True, 2, 2)  # serving all along
    fleet.record_failure(one)
    assert fleet.state_of(one) is InstanceState.EJECTED
    fleet.record_probe(one, True, 2, 2)
    assert fleet.state_of(one) is InstanceState.EJECTED
    fleet.record_probe(one, True, 2, 2)
    assert fleet.state_of(one) is InstanceState.HEALTHY


def test_pick_skips_instances_out_of_service_and_avoided() -> None:
    clock = FakeClock()
    fleet = fleet_of(3, clock, outlier=OutlierDetection(consecutive_failures=1))
    fleet.record_failure(fleet.instances[0])
    picked = Counter(fleet.pick().index for _ in range(300))  # type: ignore[union-attr]
    assert set(picked) == {1, 2}
    assert {fleet.pick([1]).index for _ in range(50)} == {2}  # type: ignore[union-attr]
    assert fleet.pick([0, 1, 2]) is None


def test_with_none_in_service_pick_falls_back_to_all_of_them() -> None:
    clock = FakeClock()
    fleet = fleet_of(2, clock)
    for instance in fleet.instances:
        fleet.record_probe(instance, False, 1, 1)
    assert {fleet.pick().index for _ in range(100)} == {0, 1}  # type: ignore[union-attr]
    assert fleet.pick([0]).index == 1  # type: ignore[union-attr]


def instances(*in_flight: int) -> list[Instance]:
    target = HttpTarget(provider="http", url="http://127.0.0.2:1")  # type: ignore[arg-type]
    made = [Instance(index, target) for index in range(len(in_flight))]
    for instance, count in zip(made, in_flight, strict=True):
        instance.in_flight = count
    return made


def test_least_request_never_picks_the_busiest_of_three_and_spreads_ties() -> None:
    balancer = LeastRequest()
    busy = instances(0, 0, 9)
    picked = Counter(balancer.choose(busy).index for _ in range(3000))
    assert set(picked) == {0, 1}  # the busiest loses every pair it is drawn in
    assert min(picked.values()) > 1000
    idle = instances(0, 0, 0)
    assert set(Counter(balancer.choose(idle).index for _ in range(300))) == {0, 1, 2}


def test_round_robin_takes_turns() -> None:
    balancer = RoundRobin()
    three = instances(5, 0, 0)
    assert [balancer.choose(three).index for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_weighted_picks_in_proportion_to_weight() -> None:
    balancer = Weighted()
    three = instances(0, 0, 0)
    for instance, weight in zip(three, (1, 3, 6), strict=True):
        instance.weight = weight
    picked = Counter(balancer.choose(three).index for _ in range(10_000))
    assert 700 < picked[0] < 1300
    assert 2500 < picked[1] < 3500
    assert 5400 < picked[2] < 6600


def test_weighted_reads_the_weights_again_when_the_set_is_replaced() -> None:
    fleet = fleet_of(2, FakeClock(), balance="weighted")
    first, second = fleet.instances
    fleet.reweigh(second, 1000)
    picked = Counter(fleet.pick().index for _ in range(2000))  # type: ignore[union-attr]
    assert picked[second.index] > 1900
    assert first.weight == 1


# -- a set that changes: join, leave ---------------------------------------------------


def other_target(last_octet: int) -> HttpTarget:
    return HttpTarget(provider="http", url=f"http://127.0.0.{last_octet}:8080")  # type: ignore[arg-type]


def test_a_joining_instance_gets_a_new_index_and_takes_calls() -> None:
    fleet = fleet_of(2, FakeClock(), balance="round_robin")
    joined = fleet.join(other_target(9), weight=2, source="dns SRV _echo._tcp.test")
    assert joined.index == 2
    assert joined.source == "dns SRV _echo._tcp.test"
    assert {fleet.pick().index for _ in range(6)} == {0, 1, 2}  # type: ignore[union-attr]
    assert fleet.member(joined.key) is joined


def test_a_leaving_instance_takes_no_new_call_and_its_index_is_never_reused() -> None:
    clock = FakeClock()
    fleet = fleet_of(3, clock, outlier=OutlierDetection(consecutive_failures=1))
    leaving = fleet.instances[1]
    leaving.in_flight = 4  # calls still running on it finish; nothing new goes there
    fleet.leave(leaving)
    assert fleet.state_of(leaving) is InstanceState.LEAVING
    assert {fleet.pick().index for _ in range(100)} == {0, 2}  # type: ignore[union-attr]
    fleet.record_failure(leaving)  # a late answer of a call sent before it left
    assert fleet.outliers.ejected == 0
    back = fleet.join(leaving.target)
    assert back.index == 3
    assert back is not leaving


def test_the_ejection_limit_follows_the_size_of_the_set() -> None:
    clock = FakeClock()
    fleet = fleet_of(2, clock, outlier=OutlierDetection(consecutive_failures=1))
    assert fleet.outliers.max_ejected == 1  # 50 % of 2
    for octet in (7, 8):
        fleet.join(other_target(octet))
    assert fleet.outliers.max_ejected == 2  # 50 % of 4
    fleet.record_failure(fleet.instances[0])
    fleet.record_failure(fleet.instances[1])
    assert fleet.outliers.ejected == 2
    fleet.leave(fleet.instances[0])  # an ejected instance leaves: its ejection ends with it
    assert fleet.outliers.ejected == 1
    assert fleet.outliers.max_ejected == 1


def test_an_empty_fleet_picks_nothing_and_says_why() -> None:
    fleet = fleet_of(1, FakeClock())
    fleet.leave(fleet.instances[0])
    assert fleet.pick() is None
    assert fleet.why_empty() == "the manifest lists none"


class _Handed:
    """A balancer that records what ``pick`` hands it and chooses the first."""

    def __init__(self) -> None:
        self.handed: list[tuple[int, ...]] = []

    def choose(self, instances: Any) -> Instance:
        self.handed.append(tuple(instance.index for instance in instances))
        return instances[0]


@pytest.mark.parametrize("seed", range(40))
def test_pick_hands_the_balancer_exactly_the_instances_in_service_as_states_change(
    seed: int,
) -> None:
    # The instances in service are kept between picks (fleet.py says why); whatever
    # happens in between (probes, failures, ejections ending with time, joins, leaves),
    # each pick must still hand over exactly those in service, or all when none is.
    chance = random.Random(seed)
    clock = FakeClock()
    fleet = fleet_of(6, clock, outlier=OutlierDetection(consecutive_failures=2))
    balancer = fleet.balancer = _Handed()  # type: ignore[assignment]
    for _ in range(300):
        draw = chance.random()
        members = fleet.instances
        if draw < 0.3 and members:
            fleet.record_probe(chance.choice(members), chance.random() < 0.5, 2, 2)
        elif draw < 0.5 and members:
            fleet.record_failure(chance.choice(members))
        elif draw < 0.6 and members:
            fleet.record_success(chance.choice(members))
        elif draw < 0.75:
            clock.advance(chance.choice([0.5, 3.0, 10.0]))
        elif draw < 0.8:
            fleet.join(members[0].target if members else fleet.target)
        elif draw < 0.85 and len(members) > 1:
            fleet.leave(chance.choice(members))
        expected = tuple(each.index for each in fleet.instances if fleet.in_service(each))
        fleet.pick()
        if fleet.instances:
            assert balancer.handed[-1] == (expected or tuple(e.index for e in fleet.instances))


def test_a_degraded_fleet_looks_at_its_instances_only_when_their_states_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With one instance of 1,000 down, every pick looked at every instance's state (78 µs
    # a call, bench fleet): now only the first pick after a change does.
    looked = 0
    is_ejected = OutlierDetector.is_ejected

    def counted(self: OutlierDetector, index: int) -> bool:
        nonlocal looked
        looked += 1
        return is_ejected(self, index)

    monkeypatch.setattr(OutlierDetector, "is_ejected", counted)
    clock = FakeClock()
    target = HttpTarget(
        provider="http",
        instances=[{"url": f"http://127.0.0.2:{8000 + index}"} for index in range(1000)],  # type: ignore[misc]
    )
    fleet = Fleet(target, target.instance_targets(), HttpProvider(), clock)
    down = fleet.instances[7]
    fleet.record_probe(down, False, 1, 1)
    picked = {fleet.pick() for _ in range(100)}
    assert down not in picked
    assert looked <= 1000  # one look at each, not one per pick
    fleet.record_probe(down, True, 1, 1)  # up again: the fast path, no look at all
    looked = 0
    assert all(fleet.pick() is not None for _ in range(100)) and looked == 0


# -- a discovery source's outages in the log ---------------------------------------------


class _Source(InstanceSource):
    async def run(self, report: Any) -> None:  # never run: the health is driven by hand
        raise AssertionError


def test_source_outages_are_logged_once_each_and_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    source = _Source("dns A echo.test:80")
    health = ReadHealth(source, logging.getLogger("test.health"), quiet=30.0, clock=clock)
    caplog.set_level(logging.INFO, "test.health")
    for _ in range(5):  # one outage, five failed reads
        health.failed("no answer")
        clock.advance(1)
    assert (source.error, source.failed_reads) == ("no answer", 5)
    health.succeeded(2)
    assert (source.error, source.reads) == (None, 1)
    clock.advance(1)
    for _ in range(3):  # three short outages within `quiet`: neither begin nor end logged
        health.failed("refused")
        health.succeeded(2)
        clock.advance(1)
    clock.advance(30)
    health.failed("no answer")  # logged again, saying how many were not
    health.succeeded(3)
    assert [record.getMessage() for record in caplog.records] == [
        "cannot read dns A echo.test:80: no answer",
        "reading dns A echo.test:80 again after 5.0 s (5 failed reads); 2 instances",
        "cannot read dns A echo.test:80: no answer (3 more outages since the last line,"
        " not logged)",
        "reading dns A echo.test:80 again after 0.0 s (1 failed read); 3 instances",
    ]
    assert source.failed_reads == 9


# -- a fleet's settings on a target that is no fleet -------------------------------------

#: One target of each provider whose targets list instances, less the one place it names.
_BASE: dict[str, dict[str, Any]] = {
    "http": {"provider": "http"},
    "grpc": {"provider": "grpc"},
    "knative": {"provider": "knative", "service": "echo"},
}
#: The field that names a target's one place, and the key of an ``instances:`` item's.
_PLACE = {"http": ("url", "url"), "grpc": ("address", "address"), "knative": ("ingress", "url")}
_HERE = {"http": "http://127.0.0.1:9", "grpc": "127.0.0.1:9", "knative": "http://127.0.0.1:9"}
_THERE = {"http": "http://127.0.0.2:9", "grpc": "127.0.0.2:9", "knative": "http://127.0.0.2:9"}

#: Each fleet setting, written as a fleet would write it.
_WRITTEN: dict[str, Any] = {
    "balance": "round_robin",
    "health_check": {"interval_ms": 1_000, "timeout_ms": 500},
    "outlier": {"consecutive_failures": 2},
}
#: Each fleet setting, written as its default: written is written.
_AT_DEFAULT: dict[str, Any] = {"balance": "least_request", "health_check": None, "outlier": {}}


def _single(provider: str) -> dict[str, Any]:
    return {**_BASE[provider], _PLACE[provider][0]: _HERE[provider]}


def _listing(provider: str, *places: str) -> dict[str, Any]:
    key = _PLACE[provider][1]
    return {**_BASE[provider], "instances": [{key: place} for place in places]}


def _load(target: dict[str, Any]) -> Any:
    from tests.conftest import manifest

    plugin = {"id": "p", "version": "1.0.0", "target": target, "methods": {"say": {}}}
    return manifest(plugin).plugins[0].target


def _refusal(target: dict[str, Any]) -> str:
    from dispatcher import ManifestError

    with pytest.raises(ManifestError) as caught:
        _load(target)
    (problem,) = caught.value.problems
    assert problem.path == "plugins[0].target"
    return problem.message


@pytest.mark.parametrize("provider", sorted(_BASE))
@pytest.mark.parametrize("field", sorted(_WRITTEN))
@pytest.mark.parametrize("values", [_WRITTEN, _AT_DEFAULT], ids=["set", "default"])
def test_a_fleet_setting_on_a_target_with_one_address_is_refused_at_load(
    provider: str, field: str, values: dict[str, Any]
) -> None:
    """It loaded and did nothing: a target naming one place is no fleet, so nothing was
    balanced, probed or ejected. Now it is refused, naming it and why, even written as its
    default; left unwritten, its default is fine."""
    message = _refusal({**_single(provider), field: values[field]})
    assert message.startswith(f"{field} is for a target with several instances")
    assert "this one has one address and would not use it" in message
    assert message.endswith("Remove it, or list the instances")
    assert _load(_single(provider)).fleet_settings() == FleetSettings()


@pytest.mark.parametrize("provider", sorted(_BASE))
def test_a_list_of_one_instance_keeps_them_for_when_it_grows(provider: str) -> None:
    """A list of one is called as a plain target (``is_fleet``), but a fleet scaled down
    to one instance keeps its settings: scaling up again is one edit of the list."""
    target = _load({**_listing(provider, _HERE[provider]), **_WRITTEN})
    assert not target.is_fleet()
    assert target.fleet_settings().balance == "round_robin"


def test_the_refusal_shows_no_credential_of_the_target() -> None:
    message = _refusal(
        {
            "provider": "http",
            "url": "http://user:url-password-0451@127.0.0.1:9",
            "headers": {"X-Api-Key": "header-secret-0451"},
            "balance": "round_robin",
        }
    )
    assert "balance is for" in message and "0451" not in message


@pytest.mark.parametrize("provider", sorted(_BASE))
@pytest.mark.parametrize(
    "source",
    [
        None,
        {"dns": {"name": "_echo._tcp.plugins.internal"}},
        {"registry": {"etcd": "http://127.0.0.1:2379", "prefix": "/linchkit/echo"}},
    ],
    ids=["fixed", "dns", "etcd"],
)
def test_a_fleet_takes_its_settings_and_its_instances_load_without_them(
    provider: str, source: dict[str, Any] | None
) -> None:
    """Two fixed instances, or one place and a discovery source: a fleet. Its instances'
    targets, fixed (``instance_targets``) or discovered (``instance_at``), are no fleet
    and are made without its settings: they load, and each equals a plain target of its
    place (one pool, channel and breaker with it)."""
    from providers.discovery import Endpoint

    if source is None:
        target = _listing(provider, _THERE[provider], _HERE[provider])
    else:
        target = {**_single(provider), "instances": [source]}
    fleet = _load({**target, **_WRITTEN})
    assert fleet.is_fleet()
    assert fleet.fleet_settings() == FleetSettings.model_validate(_WRITTEN)
    made = [*fleet.instance_targets(), fleet.instance_at(Endpoint("127.0.0.1", 9))]
    for instance in made:
        assert not instance.is_fleet() and instance.fleet_settings() == FleetSettings()
        assert not set(_WRITTEN) & instance.model_fields_set
    plain = _load(_single(provider)).key
    assert made[-1].key == plain and made[-2].key == plain
