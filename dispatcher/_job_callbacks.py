"""Job callbacks: when a job submitted with a ``callback_url`` ends, its record (as
``Dispatcher.job`` shows it) is POSTed there as JSON.

The URL is checked at submit against the manifest's ``egress`` policy (a URL it refuses
is ``InvalidParams`` then, not a failed delivery later), again by the worker's own policy
before every POST (the record was read back from the store, and may have been written by
a replica with a looser policy or by someone with the store's key), and after name
resolution when the worker connects
(the resolver of ``providers._aiohttp.open_session``), so a caller cannot make the
dispatcher reach a metadata service or a network it may not.

**Durable, at least once** where the job store keeps a ``CallbackOutbox`` (Redis jobs,
and SQS jobs with a Redis job view): the pending callback is recorded with the job's
terminal state, in one atomic step, so a worker that dies before delivering loses
nothing. Any replica's workers deliver (``run``): they claim due callbacks for a lease
(``2 x callback_timeout_ms + 2 s``; one whose claimer died falls due again after it), POST
once, and settle: 2xx delivered; 5xx, 429 and no answer due again after a doubling,
jittered pause (``callback_backoff_ms`` … ``callback_backoff_max_ms``) until
``callback_attempts`` POSTs were made; any other answer, a redirect (a 3xx is not
followed: the record must not be carried anywhere the policy did not check), a
refusal by the egress policy or a URL the HTTP client cannot use ends it at once. An ended-without-delivery callback is
dead-lettered: its job's record says ``callback: failed`` and ``callback_error`` why
(``dispatcher jobs --callback failed``). Each POST is bounded by ``callback_timeout_ms``.

Every POST of one callback carries the same ``X-Linchkit-Delivery: <id>`` header (also
the body's ``delivery_id``): a receiver that saw the id already answers 2xx and ignores
the repeat, which at-least-once delivery makes possible (a claimer that delivered and died
before settling, a lease that ran out mid-POST).

**Best effort** where the store keeps no outbox (SQS without a job view): the worker that
ended the job POSTs it with the same retries, in a task it owns (at most
``MAX_DELIVERIES`` at once); a worker stopped first loses the ones in flight, and one past
``MAX_PENDING`` waiting deliveries (or ``MAX_PENDING_BYTES`` of their bodies) is dropped.

Signing: with ``jobs.callback_secret`` set, every POST carries
``X-Linchkit-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``; a
receiver recomputes it with the shared secret and refuses an old ``t`` (a replay). The
secret and the URL (which may carry a token) are never logged; a job id and a reason are.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from dispatcher._outage_log import OutageLog
from dispatcher._public_errors import public_job
from dispatcher.config import JobsConfig
from dispatcher.state.callback_outbox import CallbackOutbox, PendingCallback
from dispatcher.state.errors import StateUnavailable
from linchkit_plugin.errors import InvalidParams
from providers._aiohttp import open_session
from providers.egress import EgressPolicy, EgressRefused
from providers.target import Destination

__all__ = [
    "DELIVERY_HEADER",
    "MAX_CALLBACK_URL",
    "SIGNATURE_HEADER",
    "JobCallbacks",
    "callback_body",
    "checked_callback_url",
    "signature",
]

log = logging.getLogger("dispatcher.jobs")

SIGNATURE_HEADER = "X-Linchkit-Signature"
DELIVERY_HEADER = "X-Linchkit-Delivery"
MAX_CALLBACK_URL = 2048
#: Deliveries running at once per dispatcher; more wait for a slot (or stay due).
MAX_DELIVERIES = 64
#: Best effort (no outbox): deliveries running or waiting at once, and the bytes of their
#: bodies. Each holds a job's whole record, and jobs may end faster than a receiver that
#: never answers lets them go; one past either bound is dropped (counted failed, logged).
#: The durable path claims only as many as it has slots for: the rest wait in the store.
MAX_PENDING = 1024
MAX_PENDING_BYTES = 256 * 1024 * 1024
#: How long ``aclose`` lets deliveries in flight finish.
CLOSE_GRACE_SECONDS = 2.0
#: How often a replica looks for callbacks another replica's jobs left due, when nothing
#: woke it sooner (its own workers wake it when they end a job that has one).
POLL_SECONDS = 0.5
#: The record's bookkeeping of its callback: not part of what is POSTed.
_BOOKKEEPING = frozenset(
    (
        "callback",
        "callback_attempts",
        "callback_claim",
        "callback_delivered_at",
        "callback_detail",
        "callback_error",
        "callback_failed_at",
        "callback_id",
    )
)

#: A job record as callers read it (``dispatcher._jobs.job_status``).
StatusOf = Callable[[dict[str, str]], dict[str, Any]]


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


def callback_body(status: dict[str, Any], delivery_id: str) -> bytes:
    """What is POSTed: the job's status without the callback's bookkeeping, and the
    delivery id (so the signature covers it). A job submitted through a gateway that
    answers ``error_detail: safe`` (``callback_detail: safe``) has its errors told as
    that gateway tells a call's (``dispatcher._public_errors``): the callback goes to
    its caller."""
    if status.get("callback_detail") == "safe":
        status = public_job(status)
    document = {name: value for name, value in status.items() if name not in _BOOKKEEPING}
    document["delivery_id"] = delivery_id
    return orjson.dumps(document)


def new_delivery_id() -> str:
    return os.urandom(12).hex()


class JobCallbacks:
    """The callback deliveries of one dispatcher's job workers (module docstring)."""

    def __init__(
        self,
        config: JobsConfig,
        egress: EgressPolicy,
        status_of: StatusOf,
        outbox: CallbackOutbox | None = None,
        *,
        pause: float = 0.5,
        max_pending: int = MAX_PENDING,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        self.config = config
        self.egress = egress
        self.status_of = status_of
        self.outbox = outbox
        self.timeout = config.callback_timeout_ms / 1000
        #: How long a claim holds a callback: one POST's bound, twice, and a margin.
        self.lease = 2 * self.timeout + 2.0
        self.pause = max(pause, 0.05)  # after the store failed: it skips itself this long
        self._session: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_DELIVERIES)
        self._runner: asyncio.Task[None] | None = None
        self._woken = asyncio.Event()
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._pending_bytes = 0
        self.delivered = 0
        self.failed = 0
        self.retried = 0
        #: The outbox's outages, logged as they begin and end rather than per failed poll.
        self._outbox_outage = OutageLog(log, "job callbacks")

    @property
    def durable(self) -> bool:
        return self.outbox is not None

    # -- durable: the outbox ------------------------------------------------------------

    def start(self) -> None:
        """Deliver due callbacks of every replica's jobs until ``aclose`` (durable only)."""
        if self.outbox is not None and self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(
                self._run(self.outbox), name="job callbacks"
            )

    def wake(self) -> None:
        """A job of this replica ended with a callback due: look now, not at the next poll."""
        self._woken.set()

    async def _run(self, outbox: CallbackOutbox) -> None:
        # Not ``while True``: on Python 3.11 a cancellation landing as ``_idle``'s timeout
        # expires can come out as that TimeoutError, which ``_idle`` suppresses; the loop
        # must still end once ``aclose`` has begun.
        while self._runner is not None:
            free = MAX_DELIVERIES - len(self._tasks)
            if free <= 0:
                await self._idle(POLL_SECONDS)
                continue
            self._woken.clear()
            try:
                due = await outbox.claim(free, self.lease)
            except StateUnavailable as error:
                self._outbox_outage.failed(error.message)
                await asyncio.sleep(self.pause)
                continue
            self._outbox_outage.recovered()
            for callback in due:
                self._own(self._settle(outbox, callback), f"callback of job {callback.job_id}")
            if len(due) < free:
                await self._idle(POLL_SECONDS)

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._woken.wait()

    async def _settle(self, outbox: CallbackOutbox, callback: PendingCallback) -> None:
        record, job_id = callback.record, callback.job_id
        delivery_id = record.get("callback_id") or job_id
        url = record.get("callback_url")
        if url is None:
            outcome, reason = "failed", "the job's record has no callback_url"
        else:
            status = self.status_of({**record, "id": job_id})
            outcome, reason = await self.post(url, callback_body(status, delivery_id), delivery_id)
        try:
            if outcome == "delivered":
                await outbox.delivered(callback)
                self.delivered += 1
            elif outcome == "retry" and callback.attempt < self.config.callback_attempts:
                await outbox.retry(callback, self.backoff(callback.attempt), reason)
                self.retried += 1
            else:
                await outbox.give_up(callback, reason)
                self.failed += 1
                log.warning(
                    "callback of job %s given up after %d POSTs: %s",
                    job_id,
                    callback.attempt,
                    reason,
                )
        except StateUnavailable as error:
            # Its claim lapses and another claim delivers it again: at least once.
            log.warning("callback of job %s: its outcome was not stored: %s", job_id, error.message)

    def backoff(self, attempt: int) -> float:
        """Seconds before POST ``attempt + 1``: doubling, capped, jittered."""
        base = self.config.callback_backoff_ms / 1000 * (2 ** min(attempt - 1, 30))
        return float(
            min(base, self.config.callback_backoff_max_ms / 1000) * random.uniform(0.5, 1.0)
        )

    # -- best effort: no outbox ------------------------------------------------------------

    def send(self, url: str, status: dict[str, Any]) -> None:
        """Deliver ``status`` to ``url`` in a task this object owns (no outbox), or drop it
        when the deliveries waiting already hold as much as they may."""
        job_id = status.get("id")
        delivery_id = new_delivery_id()
        try:
            body = callback_body(status, delivery_id)
        except TypeError:  # a record is JSON read back: not expected, but not the worker's end
            self.failed += 1
            log.error("callback of job %s not sent: its record is not JSON", job_id)
            return
        if (
            len(self._tasks) >= self.max_pending
            or self._pending_bytes + len(body) > self.max_pending_bytes
        ):
            self.failed += 1
            log.warning(
                "callback of job %s dropped: %d deliveries (%d bytes) are waiting already;"
                " their receivers answer slowly or not at all",
                job_id,
                len(self._tasks),
                self._pending_bytes,
            )
            return
        self._pending_bytes += len(body)
        self._own(self._deliver(url, job_id, body, delivery_id), f"callback of job {job_id}")

    async def _deliver(self, url: str, job_id: object, body: bytes, delivery_id: str) -> None:
        try:
            delivered = await self.deliver(url, job_id, body, delivery_id)
        finally:
            self._pending_bytes -= len(body)
        if delivered:
            self.delivered += 1
        else:
            self.failed += 1

    async def deliver(self, url: str, job_id: object, body: bytes, delivery_id: str) -> bool:
        """POST ``body`` (job ``job_id``'s record) to ``url`` until delivered or the budget
        is spent."""
        reason = "not tried"
        for attempt in range(1, self.config.callback_attempts + 1):
            outcome, reason = await self.post(url, body, delivery_id)
            if outcome == "delivered":
                return True
            if outcome == "failed":
                break
            if attempt < self.config.callback_attempts:
                self.retried += 1
                await asyncio.sleep(self.backoff(attempt))
        log.warning("callback of job %s not delivered: %s", job_id, reason)
        return False

    # -- one POST -----------------------------------------------------------------------------

    async def post(self, url: str, body: bytes, delivery_id: str) -> tuple[str, str]:
        """One POST: (``delivered`` | ``retry`` | ``failed``, why not delivered)."""
        import aiohttp

        try:
            checked_callback_url(url, self.egress)  # read back from the store: check again
        except InvalidParams as refused:
            return "failed", refused.message
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: delivery_id}
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
            return "failed", refused.message
        except (aiohttp.InvalidURL, UnicodeError) as error:
            # The client cannot use the URL at all (yarl's IDNA, aiohttp's refusal of an
            # address in a form other than a.b.c.d): no later POST would fare better.
            return (
                "failed",
                f"the HTTP client cannot use this callback_url ({type(error).__name__})",
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            return "retry", f"no answer ({type(error).__name__})"
        if 200 <= status_code < 300:
            return "delivered", ""
        if status_code >= 500 or status_code == 429:
            return "retry", f"HTTP {status_code}"
        return "failed", f"HTTP {status_code}"

    # -- tasks ----------------------------------------------------------------------------------

    def _own(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(self._bounded(work), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _bounded(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            async with self._slots:
                await work
        except Exception:  # a bug must not end silently in a task nobody awaits
            log.exception("a job callback failed unexpectedly")
        finally:
            work.close()  # cancelled while waiting for a slot: it never started

    def _opened(self) -> Any:
        if self._session is None:
            self._session = open_session(
                max_connections=MAX_DELIVERIES, keepalive_seconds=15.0, egress=self.egress
            )
        return self._session

    async def aclose(self) -> None:
        """Stop claiming; let deliveries in flight finish for a grace, cancel the rest
        (their claims lapse and another replica delivers them)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            # Bounded: a runner stuck where cancellation cannot reach must not keep the
            # dispatcher from closing (its claims lapse; another replica delivers them).
            await asyncio.wait((runner,), timeout=CLOSE_GRACE_SECONDS)
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

    def stats(self) -> dict[str, Any]:
        return {
            "durable": self.durable,
            "delivered": self.delivered,
            "failed": self.failed,
            "retried": self.retried,
            "sending": len(self._tasks),
        }

    def __repr__(self) -> str:
        return (
            f"<JobCallbacks {'durable' if self.durable else 'best effort'} "
            f"sending={len(self._tasks)} delivered={self.delivered} failed={self.failed}>"
        )
