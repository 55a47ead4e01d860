"""The HTTP provider's per-call shortcuts keep the behaviour they replace."""

from __future__ import annotations

import pytest

from providers.http import HttpProvider


@pytest.mark.parametrize("remaining", [0.0004, 0.0015, 0.2, 1.9999, 29.99987, 300.0])
def test_the_client_timeout_never_outlasts_the_deadline(remaining: float) -> None:
    timeout = HttpProvider()._timeout(remaining)
    assert timeout.total is not None
    assert timeout.total <= remaining
    assert remaining - timeout.total < 0.001


def test_client_timeouts_are_shared_between_calls_with_the_same_budget() -> None:
    provider = HttpProvider()
    assert provider._timeout(29.99981) is provider._timeout(29.99949)
    assert provider._timeout(29.99981) is not provider._timeout(29.9981)
