"""A plugin for the rollout tests: one class for both versions, told by its config how
the version behaves (what it answers, from which call on it fails, how often)."""

from __future__ import annotations

from typing import Any

from linchkit_plugin import Plugin
from linchkit_plugin.errors import PluginError


class RolloutPlugin(Plugin):
    async def init(self, config: dict[str, Any]) -> None:
        self.version = str(config.get("version", "?"))
        self.tag = str(config.get("tag", self.version))
        #: Fail every call from this call on (0: never).
        self.fail_from = int(config.get("fail_from", 0))
        #: Fail every n-th call (0: never): a shadow that sometimes fails.
        self.fail_every = int(config.get("fail_every", 0))
        #: Fail every other call retryably, the first one included: its retry succeeds.
        self.flaky = bool(config.get("flaky", False))
        self.calls = 0

    async def answer(self, x: int = 0) -> dict[str, Any]:
        self.calls += 1
        if self.flaky and self.calls % 2:
            raise PluginError(f"{self.version} flaked on call {self.calls}", retryable=True)
        if (self.fail_from and self.calls >= self.fail_from) or (
            self.fail_every and self.calls % self.fail_every == 0
        ):
            raise PluginError(f"{self.version} broke on call {self.calls}")
        return {"version": self.version, "tag": self.tag, "x": x}

    async def calls_seen(self) -> int:
        return self.calls

    async def pure_answer(self, x: int = 0, note: str = "") -> dict[str, Any]:
        """Pure in the manifest: versions agree on even ``x`` and differ on odd ones. A
        ``note`` (a caller's own data) is in the answer, and in the message of a failure."""
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise PluginError(
                f"{self.version} broke on call {self.calls}" + (f" for {note}" if note else "")
            )
        return {"x": x, "tag": self.tag if x % 2 else "same", **({"note": note} if note else {})}
