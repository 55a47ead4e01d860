"""A poller's failures against a store that is down: logged as the outage begins, reminded
now and then with the count folded in, and ended with a line (``dispatcher._outage_log``)."""

from __future__ import annotations

import logging

import pytest

from dispatcher._outage_log import OutageLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_an_outage_is_one_line_a_reminder_a_minute_and_one_line_at_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    outage = OutageLog(logging.getLogger("dispatcher.jobs"), "job workers", clock=clock)
    outage.recovered()  # nothing failed: nothing to say
    assert lines(caplog) == []
    for _ in range(240):  # four polls a second for a minute
        outage.failed("state store redis://127.0.0.1:1/0 unavailable")
        clock.now += 0.25
    assert outage.failing
    assert lines(caplog) == [
        "job workers: state store redis://127.0.0.1:1/0 unavailable",
    ]
    outage.failed("state store redis://127.0.0.1:1/0 unavailable")  # 60 s in
    assert lines(caplog)[-1] == (
        "job workers: still failing after 60 s (240 more failures since the last line): "
        "state store redis://127.0.0.1:1/0 unavailable"
    )
    clock.now += 1.0
    outage.failed("again")
    outage.recovered()
    assert lines(caplog)[-1] == (
        "job workers: working again after 61.0 s (1 failures not logged one by one)"
    )
    assert not outage.failing
    assert len(lines(caplog)) == 3
    outage.failed("a new outage")  # begins with its own first line
    assert lines(caplog)[-1] == "job workers: a new outage"
