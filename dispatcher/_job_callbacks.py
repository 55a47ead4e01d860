"""Job callbacks: when a job submitted with a ``callback_url`` ends, its record (as
``Dispatcher.job`` shows it) is POSTed there as JSON.

The URL is checked at submit against the manifest's ``egress`` policy (a URL it refuses
is ``InvalidParams`` then, not a failed delivery later), by the worker's own policy before
it sends (the record may come from elsewhere), and again after name resolution when the
worker connects (the resolver of ``providers._http_common.open_session``), so a
caller cannot make the dispatcher reach a metadata service or a network it may not.

A delivery: at most ``callback_attempts`` POSTs, each bounded by ``callback_timeout_ms``
(connect, send and the answer's head), redirects not followed (a 3xx is a failure: the
record must not be carried anywhere the policy did not check), 2xx is delivered, 5xx,
429 and transport failures are tried again after a doubling pause, any other 4xx ends
it. Best effort: deliveries run in tasks the workers own (at most ``MAX_DELIVERIES`` at
once), after the job's end is stored; a worker stopped first loses the ones in flight, and
one past ``MAX_PENDING`` waiting deliveries (or ``MAX_PENDING_BYTES`` of their bodies) is
dropped.

Signing: with ``jobs.callback_secret`` set, every delivery carries
``X-Linchkit-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``; a
receiver recomputes it with the shared secret and refuses an old ``t`` (a replay).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from typing import Any

import orjson

from dispatcher.config import JobsConfig
from linchkit_plugin.errors import InvalidParams
from providers._http_common import open_session
from providers.egress import EgressPolicy, EgressRefused
from providers.target import Destination

__all__ = [
    "MAX_CALLBACK_URL",
    "SIGNATURE_HEADER",
    "JobCallbacks",
    "checked_callback_url",
    "signature",
]

log = logging.getLogger("dispatcher.jobs")

SIGNATURE_HEADER = "X-Linchkit-Signature"
MAX_CALLBACK_URL = 2048
#: Deliveries running at once per dispatcher; more wait for a slot.
MAX_DELIVERIES = 64
#: Deliveries running or waiting at once, and the bytes of their bodies: each holds a
#: job's whole record, and jobs may end faster than a receiver that never answers lets
#: them go. One past either bound is dropped (counted failed, logged).
MAX_PENDING = 1024
MAX_PENDING_BYTES = 256 * 1024 * 1024
#: How long ``aclose`` lets deliveries in flight finish.
CLOSE_GRACE_SECONDS = 2.0


def checked_callback_url(url: object, egress: EgressPolicy) -> str:
    """``url`` if a job may call it back; ``InvalidParams`` saying why not."""
    if not isinstance(url, str) or not 0 < len(url) <= MAX_CALLBACK_URL or not url.isprintable():
        raise InvalidParams(
            f"callback_url is an http(s) URL of at most {MAX_CALLBACK_URL} characters"
        )
    destination = Destination.of_url("callback_url", url)
    if destination.scheme not in ("http", "https"):
        raise InvalidParams("callback_url must be an http or https URL")
    if _unreadable(url):
        raise InvalidParams("callback_url is not a URL an HTTP client can read (host, port)")
    refusal = egress.refusal(destination)
    if refusal is not None:
        raise InvalidParams(f"callback_url is refused by the manifest's egress policy: {refusal}")
    return url


def _unreadable(url: str) -> bool:
    """Whether the client that delivers (aiohttp, through yarl) cannot read the URL: the
    check must be of the URL it will dial, so one it reads differently is refused."""
    from yarl import URL

    try:
        parsed = URL(url)
        port = parsed.port
    except ValueError:
        return True
    return not parsed.raw_host or port is None or not 0 < port <= 65535


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The value of ``X-Linchkit-Signature`` for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


class JobCallbacks:
    """The deliveries of one dispatcher's job workers (module docstring)."""

    def __init__(
        self,
        config: JobsConfig,
        egress: EgressPolicy,
        *,
        max_pending: int = MAX_PENDING,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        self.config = config
        self.egress = egress
        self.timeout = config.callback_timeout_ms / 1000
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._session: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_DELIVERIES)
        self._pending_bytes = 0
        self.delivered = 0
        self.failed = 0

    def send(self, url: str, status: dict[str, Any]) -> None:
        """Deliver ``status`` to ``url`` in a task this object owns, or drop it when the
        deliveries waiting already hold as much as they may."""
        try:
            body = orjson.dumps(status)
        except TypeError:  # a record is JSON read back: not expected, but not the worker's end
            self.failed += 1
            log.error("callback of job %s not sent: its record is not JSON", status.get("id"))
            return
        if (
            len(self._tasks) >= self.max_pending
            or self._pending_bytes + len(body) > self.max_pending_bytes
        ):
            self.failed += 1
            log.warning(
                "callback of job %s dropped: %d deliveries (%d bytes) are waiting already;"
                " their receivers answer slowly or not at all",
                status.get("id"),
                len(self._tasks),
                self._pending_bytes,
            )
            return
        self._pending_bytes += len(body)
        task = asyncio.get_running_loop().create_task(
            self._deliver(url, status.get("id"), body), name=f"callback of job {status.get('id')}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, job_id: object, body: bytes) -> None:
        try:
            async with self._slots:
                try:
                    delivered = await self.deliver(url, job_id, body)
                except Exception:  # a bug must not end silently in a task nobody awaits
                    log.exception("callback of job %s failed unexpectedly", job_id)
                    delivered = False
        finally:
            self._pending_bytes -= len(body)
        if delivered:
            self.delivered += 1
        else:
            self.failed += 1

    async def deliver(self, url: str, job_id: object, body: bytes) -> bool:
        """POST ``body`` (job ``job_id``'s record) to ``url``, trying again as the module
        docstring says."""
        import aiohttp

        try:
            # Again here: the record may not have passed this dispatcher's check at submit
            # (a replica with a looser policy wrote it, or someone with the store's key),
            # and an address literal is dialled without the resolver's check.
            checked_callback_url(url, self.egress)
        except InvalidParams as refused:
            log.warning("callback of job %s not sent: %s", job_id, refused.message)
            return False
        pause = 0.2
        reason = "not tried"
        for attempt in range(1, self.config.callback_attempts + 1):
            headers = {"Content-Type": "application/json"}
            secret = self.config.callback_secret
            if secret is not None:
                headers[SIGNATURE_HEADER] = signature(secret, int(time.time()), body)
            try:
                async with self._opened().post(
                    url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.timeout),
                ) as answer:
                    status_code = answer.status
            except EgressRefused as refused:  # after resolution: it will not change
                reason = refused.message
                break
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                reason = type(error).__name__
            else:
                if 200 <= status_code < 300:
                    return True
                reason = f"HTTP {status_code}"
                if status_code < 500 and status_code != 429:
                    break
            if attempt < self.config.callback_attempts:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
        log.warning("callback of job %s to its callback_url not delivered: %s", job_id, reason)
        return False

    def _opened(self) -> Any:
        if self._session is None:
            self._session = open_session(
                max_connections=MAX_DELIVERIES, keepalive_seconds=15.0, egress=self.egress
            )
        return self._session

    async def aclose(self) -> None:
        if self._tasks:
            _, late = await asyncio.wait(tuple(self._tasks), timeout=CLOSE_GRACE_SECONDS)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=CLOSE_GRACE_SECONDS)
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None

    def stats(self) -> dict[str, int]:
        return {"delivered": self.delivered, "failed": self.failed, "sending": len(self._tasks)}

    def __repr__(self) -> str:
        return f"<JobCallbacks sending={len(self._tasks)} delivered={self.delivered} failed={self.failed}>"
