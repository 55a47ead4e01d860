"""The manifest's ``rollouts:`` section: traffic of one method moved between two versions.

A top-level list rather than a key on a plugin entry, because a rollout is about two
entries at once (the version it leaves and the one it moves to), and because a plugin
entry that changes is a *changed* version on reload (new chains, its cache and breaker
state lost): starting, editing or removing a rollout leaves both entries as they are.

Two kinds, one per ``plugin.method``:

- a **rollout** (``to`` + ``steps``): calls naming no exact version are split between
  ``from`` and ``to`` by the current step's percentage; a step that stays within the
  budget for ``interval_s`` gives way to the next, one that crosses it rolls back to 0 %;
- a **shadow** (``shadow: {version, percent}``): calls go to ``from``; that share of them
  is also sent to ``shadow.version`` in the background and the answers compared. Pure
  methods only: a mirrored call runs twice.
"""

from __future__ import annotations

import itertools
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from providers.target import StrictModel

__all__ = ["RolloutSpec", "ShadowSpec"]


class ShadowSpec(StrictModel):
    """Mirror ``percent`` of the calls to ``version``; its answers are compared, never returned."""

    version: str
    percent: Annotated[float, Field(gt=0, le=100)]
    # Bounded: a slow shadow version must not pile up tasks; past it a mirror is skipped
    # (counted), the caller never waits for room.
    max_in_flight: Annotated[int, Field(ge=1, le=1024)] = 16


class RolloutSpec(StrictModel):
    """One method's traffic moving from ``from`` to ``to`` (or mirrored to a ``shadow``)."""

    plugin: Annotated[str, Field(min_length=1, max_length=128)]
    method: Annotated[str, Field(min_length=1, max_length=128)]
    from_version: str = Field(alias="from", description="The version serving the method now.")
    to: str | None = None
    steps: Annotated[list[float], Field(min_length=1, max_length=100)] = Field(
        default_factory=lambda: [1.0, 10.0, 50.0, 100.0]
    )
    interval_s: Annotated[float, Field(gt=0, le=86_400)] = 60
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.01
    max_p99_ms: Annotated[float, Field(gt=0)] | None = None
    # The error rate of a handful of calls says little: it is counted over at least this
    # many, and a step advances only once the new version has answered this many.
    min_calls: Annotated[int, Field(ge=1, le=1_000_000)] = 20
    shadow: ShadowSpec | None = None

    @field_validator("steps")
    @classmethod
    def _steps_climb_to_100(cls, steps: list[float]) -> list[float]:
        if any(not 0 < step <= 100 for step in steps):
            raise ValueError("every step is a percentage in (0, 100]")
        if any(later <= earlier for earlier, later in itertools.pairwise(steps)):
            raise ValueError("steps must increase")
        if steps[-1] != 100:
            raise ValueError("the last step must be 100: a rollout ends with all traffic moved")
        return steps

    @model_validator(mode="after")
    def _one_kind(self) -> RolloutSpec:
        if (self.to is None) == (self.shadow is None):
            raise ValueError("a rollout has either 'to' (move traffic) or 'shadow' (mirror it)")
        return self

    @property
    def name(self) -> str:
        return f"{self.plugin}.{self.method}"

    @property
    def other(self) -> str:
        """The version traffic moves or is mirrored to."""
        if self.shadow is not None:
            return self.shadow.version
        assert self.to is not None, "checked when the manifest loaded"
        return self.to
