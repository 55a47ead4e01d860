"""A Lambda function's output, read from CloudWatch Logs (``dispatcher logs``).

Lambda writes what a function prints, and the runtime's ``START``/``END``/``REPORT`` lines,
to the log group ``/aws/lambda/<function name>``, one stream per execution environment
(``YYYY/MM/DD/[<version>]<id>``). ``read_logs`` reads that group with ``FilterLogEvents``
through the provider's ``logs`` client (same region, endpoint and credentials as Invoke):

* the last ``lines`` events of every stream, oldest first, as ``[<version>]<id8> | line``
  (the group is read from its start to find them);
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
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

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
    recent: deque[dict[str, Any]] = deque(maxlen=lines)
    # Event ids shown (or skipped as older than the last ``lines``), by timestamp.
    seen: dict[str, int] = {}
    newest = 0
    async for event in _events(client, plugin, target, group, start_ms=None):
        recent.append(event)
        seen[event["eventId"]] = event["timestamp"]
        newest = max(newest, event["timestamp"])
    for event in recent:
        yield _line(event)
    if not follow:
        return
    lookback_ms = int(lookback_s * 1000)
    while True:
        await asyncio.sleep(poll_s)
        start_ms = max(0, newest - lookback_ms)
        fresh = [
            event
            async for event in _events(client, plugin, target, group, start_ms=start_ms)
            if event["eventId"] not in seen
        ]
        fresh.sort(key=lambda event: event["timestamp"])
        for event in fresh:
            seen[event["eventId"]] = event["timestamp"]
            newest = max(newest, event["timestamp"])
            yield _line(event)
        # Only ids a later poll can still return need remembering.
        oldest_kept = newest - lookback_ms
        seen = {event_id: stamp for event_id, stamp in seen.items() if stamp >= oldest_kept}


async def _events(
    client: Any, plugin: PluginInfo, target: LambdaTarget, group: str, *, start_ms: int | None
) -> AsyncIterator[dict[str, Any]]:
    """Every event of the group from ``start_ms`` on, page by page, oldest first per page."""
    # Deprecated and always on at AWS; moto without it returns the streams one after another.
    arguments: dict[str, Any] = {"logGroupName": group, "interleaved": True}
    if start_ms is not None:
        arguments["startTime"] = start_ms
    while True:
        try:
            answer = await client.filter_log_events(**arguments)
        except Exception as error:
            if aws_error_code(error) == "ResourceNotFoundException":
                raise LogsUnavailable(
                    f"{plugin.key}: {target.describe()} has not run yet: there is no log "
                    f"group {group} (Lambda creates it on the first invocation)",
                    details={"log_group": group},
                ) from error
            raise translate(error, target) from error
        for event in answer.get("events", []):
            if "eventId" in event and "timestamp" in event:
                yield event
        token = answer.get("nextToken")
        if not token:
            return
        arguments["nextToken"] = token


def _line(event: dict[str, Any]) -> str:
    """``[<version>]<first 8 of the id> | message``: which execution environment wrote it."""
    stream = str(event.get("logStreamName", "?")).rpartition("/")[2]
    version, bracket, environment = stream.partition("]")
    label = f"{version}]{environment[:8]}" if bracket else stream
    message = str(event.get("message", "")).rstrip("\n")
    return f"{label} | {message}"
