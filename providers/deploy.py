"""The deploy seam: what a provider that can create its own functions implements.

Deploying is not calling: it runs from ``dispatcher deploy``, rarely, with other
credentials, so it is a seam of its own rather than more methods on ``Provider``. A
provider that deploys returns a ``Deployer`` from ``Provider.deployer()``; the deployer
may share the provider's clients, so it is used while the provider is started.

Every operation answers a ``Plan``: the steps it would take (``plan``, a dry run that
writes nothing) or took (``apply``, ``remove``), each reported to ``progress`` as it ends.
Failures raise ``DispatchError`` like calls do (``ProviderError`` for a bad package or
manifest, ``TargetUnavailable`` for an unreachable control plane, ``Forbidden`` …).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from providers.target import PluginInfo, TargetConfig

__all__ = ["Deployer", "Plan", "Progress", "Step"]

TargetT = TypeVar("TargetT", bound=TargetConfig)


@dataclass(frozen=True, slots=True)
class Step:
    """One change to one resource: ``create function echo`` or ``unchanged alias live``."""

    action: str
    resource: str
    detail: str = ""

    def render(self) -> str:
        return f"{self.action} {self.resource}" + (f" ({self.detail})" if self.detail else "")


#: Called with each step as it ends, so a long deploy shows where it is.
Progress = Callable[[Step], None]


@dataclass(frozen=True, slots=True)
class Plan:
    """The steps of one deployment of one plugin's target, in order.

    ``document`` is the rendered resource where the kind has one (a Knative Service in
    YAML), so a dry run can show exactly what would be applied.
    """

    target: str
    steps: tuple[Step, ...] = ()
    document: str = ""

    @property
    def changes(self) -> bool:
        """Whether anything is (or was) created, updated or deleted."""
        return any(step.action != "unchanged" for step in self.steps)

    def render(self) -> str:
        lines = [self.target, *(f"  {step.render()}" for step in self.steps)]
        if self.document:
            lines.append(self.document.rstrip())
        return "\n".join(lines)


class Deployer(abc.ABC, Generic[TargetT]):
    """Creates, updates and removes the function behind a target."""

    @abc.abstractmethod
    async def plan(self, plugin: PluginInfo, target: TargetT) -> Plan:
        """What ``apply`` would do, from the live state where it can be read; changes nothing."""

    @abc.abstractmethod
    async def apply(
        self, plugin: PluginInfo, target: TargetT, progress: Progress | None = None
    ) -> Plan:
        """Create or update the function; the steps taken. Running it twice changes nothing."""

    @abc.abstractmethod
    async def remove(
        self, plugin: PluginInfo, target: TargetT, progress: Progress | None = None
    ) -> Plan:
        """Delete what ``apply`` created; the steps taken. Removing nothing is not an error."""

    async def package(self, plugin: PluginInfo, target: TargetT, out_dir: Path) -> Path | None:
        """Write what ``apply`` would upload into ``out_dir``, contacting nothing; its path.

        For kinds whose artefact is a file (a Lambda zip), so other tools (SAM,
        CloudFormation, a pipeline) can deploy it. None: this kind has no such file.
        """
        return None
