"""A Lambda function's output, read from CloudWatch Logs (``dispatcher logs``).

Lambda writes what a function prints, and the runtime's ``START``/``END``/``REPORT`` lines,
to the log group ``/aws/lambda/<function name>``, one stream per execution environment
(``YYYY/MM/DD/[<version>]<id>``). ``read_logs`` reads that group with ``FilterLogEvents``
through the provider's ``logs`` client (same region, endpoint and credentials as Invoke):

* the last ``lines`` events of every stream, oldest first, as ``[<version>]<id8> | line``,
  found by reading backwards from now: the last 5 minutes, then (too few there) the last
  hour, day, week, then the whole group, at most ``MAX_PAGES`` pages a window (a window
  with more is narrowed instead). Reading a busy group from its start fetched thousands
  of pages, hundreds of MB, before printing a line;
* with ``follow``, then every ``poll_s`` the events since the newest seen, less
  ``lookback_s``: CloudWatch takes events in late (a whole invocation at once, a slow
  stream), so a poll looks back and drops the event ids it has already shown. An event
  that arrives more than ``lookback_s`` after its own timestamp is missed.

All streams of the function are read, whatever the target's qualifier: an alias names no
stream (streams carry version numbers).

Errors: no log group → ``LogsUnavailable`` (the function has not run yet: Lambda creates
the group on its first invocation); every other failure → ``errors.translate``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from linchkit_plugin.errors import DispatchError
from providers.aws_lambda.client import aws_error_code
from providers.aws_lambda.errors import translate
from providers.aws_lambda.target import LambdaTarget
from providers.base import LogsUnavailable
from providers.target import PluginInfo

__all__ = ["log_group", "read_logs"]


def log_group(function_name: str) -> str:
    """The log group of a function given by name, ``name:qualifier``, ARN or partial ARN."""
    parts = function_name.split(":")
    name = parts[parts.index("function") + 1] if "function" in parts else parts[0]
    return f"/aws/lambda/{name}"


#: The windows the last lines are looked for in, widest last (None: the whole group).
WINDOWS_MS: tuple[int | None, ...] = (
    5 * 60_000,
    60 * 60_000,
    24 * 60 * 60_000,
    7 * 24 * 60 * 60_000,
    None,
)
#: Pages read in one window before it is taken as too busy, and narrowed.
MAX_PAGES = 20
#: The narrowest window tried (a group that busy shows what one second holds).
NARROWEST_MS = 1_000


async def read_logs(
    client: Any,
    plugin: PluginInfo,
    target: LambdaTarget,
    *,
    follow: bool,
    lines: int,
    poll_s: float,
    lookback_s: float,
) -> AsyncIterator[str]:
    """The function's last ``lines`` log lines, then with ``follow`` each new one."""
    group = log_group(target.function_name)
    now_ms = int(time.time() * 1000)
    source = _Source(client, plugin, target, group)
    lookback_ms = int(lookback_s * 1000)
    tail = await _last_events(source, lines, now_ms, lookback_ms)
    for event in tail.events():
        yield _line(event)
    if not follow:
        return
    newest = tail.newest if tail.newest is not None else now_ms
    # Event ids shown, or skipped as older than the last ``lines``, by timestamp: only
    # those a later poll can still return.
    seen = tail.seen
    while True:
        await asyncio.sleep(poll_s)
        start_ms = max(0, newest - lookback_ms)
        polled = await _poll(source, start_ms, poll_s)
        fresh = [event for event in polled if event["eventId"] not in seen]
        fresh.sort(key=lambda event: event["timestamp"])
        for event in fresh:
            seen[event["eventId"]] = event["timestamp"]
            newest = max(newest, event["timestamp"])
            yield _line(event)
        oldest_kept = newest - lookback_ms
        seen = {event_id: stamp for event_id, stamp in seen.items() if stamp >= oldest_kept}


#: Attempts at one --follow poll before its failure ends the stream.
POLL_ATTEMPTS = 4


async def _poll(source: _Source, start_ms: int, poll_s: float) -> list[dict[str, Any]]:
    """One --follow poll. A retryable failure (throttled, a dropped connection, a
    timeout) is tried again after a growing pause: one failed poll of a long follow
    ended it, and the operator had to start it again."""
    for attempt in range(POLL_ATTEMPTS):
        try:
            return [event async for event in _events(source, start_ms=start_ms)]
        except DispatchError as error:
            if not error.retryable or attempt == POLL_ATTEMPTS - 1:
                raise
            await asyncio.sleep(error.retry_after or poll_s * 2**attempt)
    return []  # not reached: the last attempt returns or raises


@dataclass(frozen=True, slots=True)
class _Source:
    """The log group one ``read_logs`` reads, and what its errors name."""

    client: Any
    plugin: PluginInfo
    target: LambdaTarget
    group: str


class _Tail:
    """The last ``lines`` events read from a window, and the ids of every event read
    within ``lookback_ms`` of the newest (a --follow poll looks back that far: an event
    skipped as older than the last ``lines`` must not be shown by it)."""

    def __init__(self, lines: int, lookback_ms: int) -> None:
        self._recent: deque[dict[str, Any]] = deque(maxlen=lines)
        self._lookback_ms = lookback_ms
        self.seen: dict[str, int] = {}
        self.newest: int | None = None
        self._prune_at = 1_000

    def add(self, event: dict[str, Any]) -> None:
        self._recent.append(event)
        stamp = event["timestamp"]
        self.seen[event["eventId"]] = stamp
        self.newest = stamp if self.newest is None else max(self.newest, stamp)
        if len(self.seen) >= self._prune_at:  # now and then: pruning is a pass over all
            oldest_kept = self.newest - self._lookback_ms
            self.seen = {key: value for key, value in self.seen.items() if value >= oldest_kept}
            self._prune_at = 2 * len(self.seen) + 1_000

    def __len__(self) -> int:
        return len(self._recent)

    def events(self) -> list[dict[str, Any]]:
        return sorted(self._recent, key=lambda event: event["timestamp"])


async def _last_events(source: _Source, lines: int, now_ms: int, lookback_ms: int) -> _Tail:
    """The last ``lines`` events before ``now_ms`` from the narrowest window
    (``WINDOWS_MS``) that holds that many; a window too busy to read in ``MAX_PAGES``
    pages is narrowed until one fits, and what that one holds is shown."""
    windows = list(WINDOWS_MS) if lines else [NARROWEST_MS]
    while True:
        span = windows.pop(0)
        start_ms = None if span is None else max(0, now_ms - span)
        tail, complete = await _window(source, lines, lookback_ms, start_ms)
        if not complete and span is not None and span > NARROWEST_MS:
            windows = [max(NARROWEST_MS, span // 10)]  # too busy: narrower, never wider
            continue
        if len(tail) >= lines or not windows:
            return tail


async def _window(
    source: _Source, lines: int, lookback_ms: int, start_ms: int | None
) -> tuple[_Tail, bool]:
    """The events from ``start_ms`` on, and whether the window was read to its end
    within ``MAX_PAGES`` pages."""
    tail = _Tail(lines, lookback_ms)
    async for event, page in _paged(source, start_ms, max_pages=MAX_PAGES + 1):
        if page > MAX_PAGES:
            return tail, False
        tail.add(event)
    return tail, True


async def _events(source: _Source, *, start_ms: int | None) -> AsyncIterator[dict[str, Any]]:
    """Every event of the group from ``start_ms`` on, page by page, oldest first per page."""
    async for event, _ in _paged(source, start_ms):
        yield event


async def _paged(
    source: _Source, start_ms: int | None, *, max_pages: int | None = None
) -> AsyncIterator[tuple[dict[str, Any], int]]:
    """Each event of the group from ``start_ms`` on, with the number of its page (from 1),
    up to ``max_pages`` pages."""
    # Deprecated and always on at AWS; moto without it returns the streams one after another.
    arguments: dict[str, Any] = {"logGroupName": source.group, "interleaved": True}
    if start_ms is not None:
        arguments["startTime"] = start_ms
    page = 0
    while True:
        page += 1
        answer = await _filter(source, arguments)
        for event in answer.get("events", []):
            if "eventId" in event and "timestamp" in event:
                yield event, page
        token = answer.get("nextToken")
        if not token or page == max_pages:
            return
        arguments["nextToken"] = token


async def _filter(source: _Source, arguments: dict[str, Any]) -> Any:
    try:
        return await source.client.filter_log_events(**arguments)
    except Exception as error:
        if aws_error_code(error) == "ResourceNotFoundException":
            raise LogsUnavailable(
                f"{source.plugin.key}: {source.target.describe()} has not run yet: there is "
                f"no log group {source.group} (Lambda creates it on the first invocation)",
                details={"log_group": source.group},
            ) from error
        raise translate(error, source.target, service="logs") from error


def _line(event: dict[str, Any]) -> str:
    """``[<version>]<first 8 of the id> | message``: which execution environment wrote it."""
    stream = str(event.get("logStreamName", "?")).rpartition("/")[2]
    version, bracket, environment = stream.partition("]")
    label = f"{version}]{environment[:8]}" if bracket else stream
    message = str(event.get("message", "")).rstrip("\n")
    return f"{label} | {message}"
