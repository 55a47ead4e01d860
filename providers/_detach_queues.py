"""Detaching many attachments at once, by the queues providers put them in.

``Provider.detach_queue`` says which detaches depend on each other's order (the entries at
one gRPC address: the service keeps the config of the one detached last): those of one
queue go one after another, in the order given; different queues go at once, for they
share nothing, so slow detaches cost the slowest one, not their sum. The dispatcher's
ledger of attachments (``dispatcher._attachments``) and the instances discovery brought to
a fleet (``dispatcher.fleet.discovered``) both detach through ``in_queues``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import TypeVar

__all__ = ["in_queues"]

T = TypeVar("T")


async def in_queues(
    items: Iterable[T],
    queue_of: Callable[[T], Hashable],
    detach: Callable[[T], Awaitable[object]],
    *,
    slots: asyncio.Semaphore | None = None,
) -> None:
    """``detach`` each of ``items``: one after another, in their order, within a queue
    (``queue_of``), the queues at once, each detach holding one of ``slots`` (if given:
    a bound on those under way, which the caller may share between calls). ``detach``
    must not raise for a detach that failed (it logs it): one queue's failure stops none
    of the others, and what such a raise carries is raised once every queue has ended.

    A cancel cuts no detach in half (a process taken out of its provider's hands and not
    stopped, a service with its ``Stop`` and no ``Destroy``): the detaches under way end,
    none starts after it (nor one still waiting for a slot), then it is raised."""
    queues: dict[Hashable, list[T]] = {}
    for each in items:
        queues.setdefault(queue_of(each), []).append(each)
    given_up = False

    async def in_turn(queue: list[T]) -> None:
        for each in queue:
            async with slots or contextlib.nullcontext():
                if given_up:
                    return
                await detach(each)

    # Every queue to its end before anything is raised: a provider must not be closed
    # under a detach still running in another queue.
    everything = asyncio.gather(
        *(in_turn(queue) for queue in queues.values()), return_exceptions=True
    )
    while not everything.done():
        try:
            await asyncio.shield(everything)
        except asyncio.CancelledError:
            given_up = True
    for outcome in everything.result():
        if isinstance(outcome, BaseException):  # not a failed detach (``detach`` logs those)
            raise outcome
    if given_up:
        raise asyncio.CancelledError
