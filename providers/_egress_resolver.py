"""The aiohttp resolver of the HTTP providers' sessions: the egress policy after resolution.

It wraps aiohttp's default resolver. A name the policy refuses is not even looked up; of
the addresses a name resolves to, only those the policy admits are returned, so aiohttp
never dials the others; a name left with none raises ``EgressRefused``, which aiohttp lets
through unchanged (it wraps only ``OSError``), so the call fails before a byte is sent.
Results are what aiohttp caches, so a cached address was checked when it was resolved.
Imported with aiohttp, when a session opens (``providers._aiohttp.open_session``).
"""

from __future__ import annotations

import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from providers.egress import EgressPolicy, EgressRefused

__all__ = ["EgressResolver"]


class EgressResolver(AbstractResolver):
    """aiohttp's default resolver, filtered by an ``EgressPolicy``."""

    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        refusal = self._policy.name_refusal(host)
        if refusal is not None:
            raise EgressRefused(f"egress policy refuses {host}: {refusal}")
        results = await self._resolver.resolve(host, port, family)
        admitted = set(self._policy.admitted(host, [result["host"] for result in results]))
        return [result for result in results if result["host"] in admitted]

    async def close(self) -> None:
        await self._resolver.close()
