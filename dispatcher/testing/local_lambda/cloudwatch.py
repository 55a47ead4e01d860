"""The runtime containers' output, shipped to moto's CloudWatch Logs as Lambda ships it.

On AWS, what a function prints and the runtime's ``START``/``END``/``REPORT`` lines go to
CloudWatch Logs: group ``/aws/lambda/<function name>``, one stream per execution
environment, named ``YYYY/MM/DD/[<version>]<32 hex id>``. ``LogShipper`` does the same
here, into the CloudWatch Logs service of the moto server behind the local Lambda
(``CreateLogGroup``, ``CreateLogStream``, ``PutLogEvents``), so whatever reads CloudWatch
(``dispatcher logs``, ``aws logs tail``, boto3) sees what AWS would show.

``ship(environment, ...)`` is called after each invocation, once the answer is on its way:
a background task waits ``delay`` (50 ms, so a busy warm environment is read once for
many invocations, as Lambda batches its shipping), reads the container's stdout written
since the last shipment (the engine's own timestamps become the events' timestamps),
waits up to ~1 s for the invocation's ``REPORT`` line, and puts the lines. One task per
environment at a time: a call meanwhile asks it to go round once more. Shipping never
fails an invocation; a failure is logged: lines moto could not be reached for wait for
the next shipment, lines it refuses are dropped. ``flush()`` waits until everything
invoked so far is shipped; ``aclose()`` cancels what is still going.

The requests are signed as the invocation's own request was (access key and region), so
moto files the logs under the account and region that hold the function; the vendor SDK
stays in ``providers/aws_lambda/client.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from dispatcher.testing.local_lambda.engine import DockerEngine

if TYPE_CHECKING:
    from collections.abc import Mapping

    import aiohttp

    from dispatcher.testing.local_lambda.function import Function
    from dispatcher.testing.local_lambda.runtime import Environment

__all__ = ["Caller", "LogShipper", "log_group", "log_stream"]

log = logging.getLogger("dispatcher.testing.lambda")

# PutLogEvents takes at most 10,000 events and 1,048,576 bytes (26 more per event) a
# call, and 256 KB per event.
_BATCH_EVENTS = 10_000
_BATCH_BYTES = 1_048_576
_EVENT_OVERHEAD = 26
_EVENT_BYTES = 256 * 1024 - _EVENT_OVERHEAD


@dataclass(frozen=True, slots=True)
class Caller:
    """Whom an invocation was signed by: moto keeps state per account (key) and region."""

    access_key: str
    region: str

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> Caller:
        """From ``Authorization: AWS4-HMAC-SHA256 Credential=KEY/DATE/REGION/SERVICE/...``."""
        _, _, credential = headers.get("Authorization", "").partition("Credential=")
        parts = credential.split(",")[0].split("/")
        access_key = parts[0] if parts[0] else "testing"
        region = parts[2] if len(parts) > 2 and parts[2] else "us-east-1"
        return cls(access_key, region)

    def headers(self, action: str) -> dict[str, str]:
        """The headers of a CloudWatch Logs JSON request moto routes and files as ours."""
        day = time.strftime("%Y%m%d", time.gmtime())
        return {
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"Logs_20140328.{action}",
            "Authorization": (
                f"AWS4-HMAC-SHA256 Credential={self.access_key}/{day}/{self.region}/logs/"
                "aws4_request, SignedHeaders=host, Signature=0"
            ),
        }


def log_group(function: Function) -> str:
    return f"/aws/lambda/{function.name}"


def log_stream(function: Function, environment: Environment, now: float | None = None) -> str:
    """``YYYY/MM/DD/[<version>]<id>``: the day the environment started, its 32 hex id."""
    day = time.strftime("%Y/%m/%d", time.gmtime(time.time() if now is None else now))
    return f"{day}/[{function.version}]{environment.container[:32]}"


@dataclass(eq=False)
class _Stream:
    """One environment's stream and how far its container's output has been shipped."""

    container: str
    group: str
    name: str
    caller: Caller
    #: The engine's time of the last line shipped (``since``), and the lines at that time.
    cursor: str | None = None
    at_cursor: set[str] = field(default_factory=set)
    created: bool = False
    again: bool = False
    task: asyncio.Task[None] | None = None


class LogShipper:
    """Each runtime container's stdout into moto's CloudWatch Logs, in the background."""

    def __init__(
        self,
        control_plane_url: str,
        session: aiohttp.ClientSession,
        docker: DockerEngine,
        *,
        delay: float = 0.05,
    ) -> None:
        self.url = control_plane_url
        self.delay = delay
        self._session = session
        self._docker = docker
        self._streams: dict[str, _Stream] = {}
        self.shipped = 0

    def __repr__(self) -> str:
        busy = len(self._pending())
        return f"<LogShipper streams={len(self._streams)} busy={busy} shipped={self.shipped}>"

    def ship(self, environment: Environment, function: Function, caller: Caller) -> None:
        """Ship what the environment's container wrote since the last time, soon."""
        stream = self._streams.get(environment.container)
        if stream is None:
            stream = self._streams[environment.container] = _Stream(
                environment.container,
                log_group(function),
                log_stream(function, environment),
                caller,
            )
        if _running(stream):
            stream.again = True
            return
        stream.task = asyncio.get_running_loop().create_task(self._pump(stream))

    async def flush(self) -> None:
        """Wait until what every container wrote up to the last ``ship`` is shipped."""
        while pending := self._pending():
            await asyncio.gather(*pending, return_exceptions=True)

    async def aclose(self) -> None:
        pending = self._pending()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._streams.clear()

    def _pending(self) -> list[asyncio.Task[None]]:
        return [s.task for s in self._streams.values() if s.task is not None and not s.task.done()]

    async def _pump(self, stream: _Stream) -> None:
        while True:
            await asyncio.sleep(self.delay)
            stream.again = False
            try:
                await self._ship_new(stream)
            except Exception:  # never an invocation's failure; the next shipment retries
                log.warning("shipping the log of %s failed", stream.name, exc_info=True)
            if not stream.again:
                return

    async def _ship_new(self, stream: _Stream) -> None:
        # REPORT may reach the engine's log a moment after the answer: wait up to ~1 s.
        events: list[tuple[int, str, str]] = []
        for _ in range(50):
            events = await self._read(stream)
            if events and events[-1][2].startswith("REPORT RequestId:"):
                break
            await asyncio.sleep(0.02)
        if not events:
            return
        await self._put(stream, [(stamp, text) for stamp, _, text in events])
        last = events[-1][1]
        at_last = {f"{since} {text}" for _, since, text in events if since == last}
        if last == stream.cursor:
            at_last |= stream.at_cursor
        stream.cursor, stream.at_cursor = last, at_last
        self.shipped += len(events)

    async def _read(self, stream: _Stream) -> list[tuple[int, str, str]]:
        """The lines written since the cursor: (milliseconds, engine time, text)."""
        events = []
        for stamp, text in await self._docker.timed_lines(stream.container, since=stream.cursor):
            parsed = _engine_time(stamp)
            if parsed is None:
                continue
            since, milliseconds = parsed
            if since == stream.cursor and f"{since} {text}" in stream.at_cursor:
                continue  # ``since`` is inclusive: shipped last time
            events.append((milliseconds, since, text))
        return events

    async def _put(self, stream: _Stream, events: list[tuple[int, str]]) -> None:
        if not stream.created:
            await self._create(stream)
        # PutLogEvents refuses events out of order; the engine's clock could step back.
        for batch in _batches(sorted(events, key=lambda event: event[0])):
            body = {
                "logGroupName": stream.group,
                "logStreamName": stream.name,
                "logEvents": [{"timestamp": stamp, "message": text} for stamp, text in batch],
            }
            status, error = await self._call(stream.caller, "PutLogEvents", body)
            if error == "ResourceNotFoundException":
                # moto was reset (tests do) since the stream was made: make it again.
                await self._create(stream)
                status, error = await self._call(stream.caller, "PutLogEvents", body)
            if status != 200:
                log.warning("PutLogEvents to %s failed: %s %s", stream.name, status, error)

    async def _create(self, stream: _Stream) -> None:
        for action, body in (
            ("CreateLogGroup", {"logGroupName": stream.group}),
            ("CreateLogStream", {"logGroupName": stream.group, "logStreamName": stream.name}),
        ):
            status, error = await self._call(stream.caller, action, body)
            if status != 200 and error != "ResourceAlreadyExistsException":
                log.warning("%s %s failed: %s %s", action, stream.name, status, error)
        stream.created = True

    async def _call(self, caller: Caller, action: str, body: dict[str, Any]) -> tuple[int, str]:
        """One CloudWatch Logs request to moto: its status and error type ("" if none)."""
        async with self._session.post(
            f"{self.url}/", data=orjson.dumps(body), headers=caller.headers(action)
        ) as response:
            answer = await response.read()
        if response.status == 200:
            return 200, ""
        try:
            error = str(orjson.loads(answer).get("__type", "")).rpartition("#")[2]
        except (orjson.JSONDecodeError, AttributeError):
            error = answer[:200].decode("utf-8", "replace")
        return response.status, error


def _running(stream: _Stream) -> bool:
    return stream.task is not None and not stream.task.done()


def _engine_time(stamp: str) -> tuple[str, int] | None:
    """The engine's RFC 3339 time (``2026-12-01T20:05:33.123456789Z``) as ``since``
    (``seconds.nanoseconds``) and as epoch milliseconds."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    try:
        seconds = int(datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp())
    except ValueError:
        return None
    nanoseconds = fraction[:9].ljust(9, "0")
    if not nanoseconds.isdigit():
        return None
    return f"{seconds}.{nanoseconds}", seconds * 1000 + int(nanoseconds) // 1_000_000


def _batches(events: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """``events`` in PutLogEvents-sized batches, each message cut to the per-event limit."""
    batches: list[list[tuple[int, str]]] = [[]]
    size = 0
    for stamp, text in events:
        message = text.encode()[:_EVENT_BYTES].decode("utf-8", "ignore") or " "
        cost = len(message.encode()) + _EVENT_OVERHEAD
        if len(batches[-1]) >= _BATCH_EVENTS or size + cost > _BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append((stamp, message))
        size += cost
    return [batch for batch in batches if batch]
