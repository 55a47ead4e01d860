"""A plugin for the async-job tests: its side effect is a counter on a real Redis.

``work`` increments ``{prefix}:effects:{n}`` on every run, so a test reads how often each
job really ran, whichever process (a worker that was killed or not) ran it.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import redis.asyncio as aioredis

from linchkit_plugin import Plugin, current_context
from linchkit_plugin.errors import PluginError, TargetUnavailable

_APPLY_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX') then redis.call('INCR', KEYS[2]) end
return 0
"""


class JobPlugin(Plugin):
    async def init(self, config: dict[str, Any]) -> None:
        self.prefix = config["prefix"]
        self.redis = aioredis.Redis.from_url(config["url"])

    async def destroy(self) -> None:
        await self.redis.aclose()

    async def work(self, n: int) -> dict[str, int]:
        runs = await self.redis.incr(f"{self.prefix}:effects:{n}")
        key = current_context().get("idempotency_key")
        if key is not None:
            # What a plugin does for effects applied exactly once (the dispatcher passes the
            # key on for this): the effect and the key's mark in one atomic step, so a run
            # the dispatcher could not record before its worker died applies nothing twice.
            await self.redis.eval(
                _APPLY_ONCE, 2, f"{self.prefix}:seen:{key}", f"{self.prefix}:applied:{n}"
            )
        return {"n": n, "runs": int(runs)}

    async def slow(self, n: int, seconds: float) -> dict[str, int]:
        """Counts its start at once; the first start sleeps ``seconds`` before its effect
        (its worker is to be killed meanwhile), a later one goes straight on."""
        if await self.redis.incr(f"{self.prefix}:started:{n}") == 1:
            await asyncio.sleep(seconds)
        return await self.work(n)

    async def echo(self, text: str) -> str:
        return text

    async def busy(self) -> None:
        """Always a retryable failure, asking to come back soon."""
        await self.redis.incr(f"{self.prefix}:effects:busy")
        raise TargetUnavailable("always busy", retry_after=0.01)

    async def refuse(self) -> None:
        await self.redis.incr(f"{self.prefix}:effects:refused")
        raise PluginError("no such account", remote_type="NoAccount", retryable=False)

    async def refuse_oddly(self) -> None:
        """``refuse``, its details and retry_after what JSON cannot carry."""
        details = {"balance": math.nan}
        raise PluginError("no such account", remote_type="NoAccount", details=details)

    async def ratio(self) -> dict[str, float]:
        return {"ratio": math.nan}
