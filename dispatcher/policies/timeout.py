"""The deadline guard, for providers that cannot enforce a deadline with their own client.

Built-in providers pass the deadline to their transport (a client timeout is cheaper and
cancels the request on the wire); a provider that sets ``enforces_deadline = False`` gets
this step, so every call still ends by its deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from linchkit_plugin.errors import DeadlineExceeded
from providers.invocation import Invocation

__all__ = ["DeadlineGuard"]


class DeadlineGuard:
    __slots__ = ("name", "next")

    def __init__(self, name: str, next_step: Callable[[Invocation], Awaitable[Any]]) -> None:
        self.name = name
        self.next = next_step

    async def __call__(self, invocation: Invocation) -> Any:
        remaining = invocation.remaining()
        if remaining <= 0:
            raise DeadlineExceeded(f"{self.name}: deadline passed before the call started")
        try:
            async with asyncio.timeout(remaining):
                return await self.next(invocation)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{self.name} did not answer within {remaining * 1000:.0f} ms"
            ) from None
