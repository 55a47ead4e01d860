"""Outlier detection: eject an instance that keeps failing calls, for a while.

Passive health, read from the calls themselves: an instance whose calls end with
``consecutive_failures`` health failures in a row (``is_health_failure``: it could not be
reached, timed out, failed as a service, throttled or broke the contract; never a
plugin's own error, never invalid params) is ejected: the balancer sends it nothing until
its ejection time has passed. Each ejection lasts longer than the previous one
(``base_ejection`` times ``ejections``, at most ``max_ejection``); the count decays by one for
every ``base_ejection`` an instance then stays in service, so an instance that failed
once long ago starts from the base again. At most ``max_ejected_percent`` of the
instances are ejected at once (at least one when the percentage is above zero): a fleet
whose instances all fail has a problem ejection would only hide, so past the limit
failing instances stay in service and the breaker or the retry policy take over.

Free of I/O, with an injected clock, and tested synchronously like the breaker
(``tests/test_fleet_model.py``). Instances are named by their fleet index, a number never
reused within a fleet, so the set may change while the detector runs: ``resize`` when
instances join or leave (the ejection limit follows the size), ``forget`` one that left. Transitions, per instance:

    in service ──failure, consecutive_failures reached, under the limit──► ejected
    in service ──failure, below consecutive_failures or at the limit──► in service (counted)
    in service ──success──► in service (count reset)
    ejected ──ejection time passed (read when next asked)──► in service (count reset)
    ejected ──release() (an active health check passed)──► in service
    ejected ──any outcome (a call sent before the ejection)──► ejected (ignored)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["OutlierDetector"]

log = logging.getLogger("dispatcher.fleet")

Clock = Callable[[], float]


class OutlierDetector:
    """The ejection state of the instances of one fleet, by index."""

    __slots__ = (
        "_clock",
        "base_ejection",
        "consecutive_failures",
        "describe",
        "ejected",
        "ejected_until",
        "ejections",
        "failures",
        "max_ejected",
        "max_ejected_percent",
        "max_ejection",
        "name",
        "returned_at",
        "total_ejections",
    )

    def __init__(
        self,
        name: str,
        size: int,
        *,
        consecutive_failures: int,
        base_ejection: float,
        max_ejection: float,
        max_ejected_percent: int,
        clock: Clock,
        describe: Callable[[int], str] | None = None,
    ) -> None:
        self.name = name
        #: How log lines name the instance at an index (a fleet gives ``Instance.label``).
        self.describe = describe or _by_index
        self.consecutive_failures = consecutive_failures
        self.base_ejection = base_ejection
        self.max_ejection = max(max_ejection, base_ejection)
        self.max_ejected_percent = max_ejected_percent
        #: How many instances may be ejected at once (``resize``).
        self.max_ejected = 0
        self._clock = clock
        #: Health failures in a row, per instance (absent: none).
        self.failures: dict[int, int] = {}
        #: Ejections counted towards the next one's length (decays while in service).
        self.ejections: dict[int, int] = {}
        #: When each ejection ends; absent for an instance in service.
        self.ejected_until: dict[int, float] = {}
        self.returned_at: dict[int, float] = {}
        #: Instances ejected now (some may be past their time until next asked).
        self.ejected = 0
        self.total_ejections = 0
        self.resize(size)

    def resize(self, size: int) -> None:
        """The fleet has ``size`` instances now: the ejection limit follows."""
        allowed = size * self.max_ejected_percent // 100
        self.max_ejected = max(1, allowed) if self.max_ejected_percent > 0 else 0

    def forget(self, index: int) -> None:
        """``index`` left the fleet: drop its state (an ejection of it ends)."""
        if self.ejected_until.pop(index, None) is not None:
            self.ejected -= 1
        self.failures.pop(index, None)
        self.ejections.pop(index, None)
        self.returned_at.pop(index, None)

    def record_success(self, index: int) -> None:
        self.failures[index] = 0

    def record_failure(self, index: int) -> bool:
        """Count a health failure of ``index``; True when it ejects the instance."""
        if index in self.ejected_until:
            return False  # sent before it was ejected: says nothing new
        failures = self.failures[index] = self.failures.get(index, 0) + 1
        if failures < self.consecutive_failures:
            return False
        self.release_expired()
        if self.ejected >= self.max_ejected:
            return False
        self._eject(index)
        return True

    def is_ejected(self, index: int) -> bool:
        """True while ``index`` is ejected; an ejection past its time ends here."""
        until = self.ejected_until.get(index)
        if until is None:
            return False
        if self._clock() < until:
            return True
        self.release(index)
        return False

    def release(self, index: int) -> None:
        """Put ``index`` back in service now (its time passed, or a health check passed)."""
        if self.ejected_until.pop(index, None) is None:
            return
        self.ejected -= 1
        self.failures[index] = 0
        self.returned_at[index] = self._clock()
        log.info("%s: %s back in service", self.name, self.describe(index))

    def release_expired(self) -> None:
        if self.ejected:
            for index in list(self.ejected_until):
                self.is_ejected(index)

    def ejection_left(self, index: int) -> float:
        """Seconds until ``index`` is back in service (0 when it is)."""
        until = self.ejected_until.get(index)
        return max(0.0, until - self._clock()) if until is not None else 0.0

    def _eject(self, index: int) -> None:
        now = self._clock()
        previous = self.ejections.get(index, 0)
        if previous:
            in_service = now - self.returned_at.get(index, now)
            previous = max(0, previous - int(in_service // self.base_ejection))
        ejections = self.ejections[index] = previous + 1
        duration = min(self.base_ejection * ejections, self.max_ejection)
        self.ejected_until[index] = now + duration
        self.ejected += 1
        self.total_ejections += 1
        self.failures[index] = 0
        log.warning(
            "%s: %s ejected for %.1f s after %d failures in a row (ejection %d)",
            self.name,
            self.describe(index),
            duration,
            self.consecutive_failures,
            ejections,
        )

    def __repr__(self) -> str:
        return (
            f"<OutlierDetector {self.name} ejected={self.ejected}/{self.max_ejected}"
            f" failures={self.failures}>"
        )


def _by_index(index: int) -> str:
    return f"instance {index}"
