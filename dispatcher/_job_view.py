"""What a caller sees of an async job: the checks at ``submit`` and the record it queues,
its status record, its result (waited for). ``Dispatcher.submit`` decides who may submit
and which route a job takes; the rest of a submission is here. The workers that run jobs
are ``dispatcher._jobs``; the durable store is the state backend's (``dispatcher.state``)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from dispatcher._job_callbacks import checked_callback_url
from dispatcher._jobs import (
    JobExpired,
    JobNotFinished,
    JobNotFound,
    JobsUnavailable,
    job_outcome,
    new_job_record,
)
from dispatcher._jobs import job_status as decoded_status
from dispatcher._public_errors import ErrorDetail
from dispatcher._routes import Route, checked_timeout
from dispatcher._text import checked_text
from dispatcher.policies.idempotency import checked_idempotency_key, with_range_version
from dispatcher.state import (
    ANY_VERSION,
    Claim,
    IdempotencyStore,
    JobStore,
    StateBackend,
    StateUnavailable,
    digest,
    encode_result,
)
from dispatcher.state.job_store import TERMINAL_STATES
from linchkit_plugin.errors import DeadlineExceeded, DispatchError, InvalidParams, ProviderError
from linchkit_plugin.wire import encode_json
from providers.egress import EgressPolicy
from providers.invocation import new_request_id

__all__ = [
    "Submission",
    "Submissions",
    "job_result",
    "job_status",
    "job_store_of",
    "new_submission",
    "owned_job_status",
    "queue_job",
    "queue_job_once",
]


class Submissions:
    """This replica's submissions by route and outcome, for telemetry: ``queued`` (a new
    job), ``replayed`` (a keyed submission answered its earlier job's id), or the type of
    the error that refused it. Routes are the manifest's, outcomes a few words."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}

    def count(self, route: Route, outcome: str) -> None:
        name = f"{route.plugin}@{route.version}.{route.method}"
        by_outcome = self.counts.setdefault(name, {})
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1

    async def queue(
        self,
        store: JobStore,
        idempotency: IdempotencyStore,
        retention: float,
        submission: Submission,
        route: Route,
        caller_id: str | None,
        max_params_bytes: int,
        *,
        named: str | None,
    ) -> str:
        """Queue the job, once per idempotency key (``queue_job_once``), and count how
        it went; ``named``: the version or range the submission named."""
        try:
            job_id = await queue_job_once(
                store,
                idempotency,
                retention,
                submission,
                route,
                caller_id,
                max_params_bytes,
                version_named=named is not None,
                wanted=None if named is None or named == route.version else named,
            )
        except DispatchError as error:
            self.count(route, error.type)
            raise
        # An id other than the one this submission made: its key's earlier job.
        self.count(route, "queued" if job_id == submission.job_id else "replayed")
        return job_id

    def stats(self) -> dict[str, dict[str, int]]:
        return {route: dict(each) for route, each in self.counts.items()}


#: A job id as a dispatcher makes one (``new_request_id``), and as the gateway reads one.
_JOB_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
#: How often ``job_result`` reads the record again when no notification came.
_POLL_SECONDS = 0.5
#: How long a keyed submission waits for another of the same key that is being queued
#: (a write to the store, milliseconds), and how long that one holds the key at most.
_SUBMIT_WAIT_SECONDS = 5.0
#: How often a keyed submission waiting for another looks again without a notification.
_SUBMIT_POLL_SECONDS = 0.05


def job_store_of(backend: StateBackend | None) -> JobStore:
    """The store jobs are kept in; ``JobsUnavailable`` when the backend keeps none."""
    store = backend.jobs if backend is not None else None
    if store is None:
        raise JobsUnavailable(
            "async jobs need a durable store: set 'state: {backend: redis, url: …}' or "
            "'jobs: {backend: sqs, …}' in the manifest (the memory backend would lose them "
            "with this process)"
        )
    return store


@dataclass(frozen=True, slots=True)
class Submission:
    """A job being submitted, checked as far as it can be before its route is known."""

    job_id: str
    params: Any
    idempotency_key: str | None
    callback_url: str | None
    #: How its callback tells an infrastructure error (``dispatcher._public_errors``).
    callback_detail: ErrorDetail = "full"

    @property
    def split_key(self) -> str:
        """What a rollout places the job by: its idempotency key (its repeats, and a keyed
        call, go where it went), else its own id (each attempt goes where the first went
        while the rollout's step holds)."""
        return self.job_id if self.idempotency_key is None else self.idempotency_key


def new_submission(
    params: Any,
    idempotency_key: object,
    callback_url: object,
    egress: EgressPolicy,
    error_detail: ErrorDetail = "full",
) -> Submission:
    """A new job id and the submission's own checks: the key's size, and ``callback_url``
    allowed by the manifest's ``egress``; ``InvalidParams`` saying which failed."""
    return Submission(
        new_request_id(),
        {} if params is None else params,
        None if idempotency_key is None else checked_idempotency_key(idempotency_key),
        None if callback_url is None else checked_callback_url(callback_url, egress),
        error_detail,
    )


async def queue_job(
    store: JobStore,
    submission: Submission,
    route: Route,
    caller_id: str | None,
    max_params_bytes: int,
) -> str:
    """Check ``submission``'s params against ``route``'s method and queue its record;
    its job id. The version is fixed now (a reload later does not change what it runs),
    unless a rollout chose it: then the rollout places the job again when it runs."""
    if route.validate is not None:
        route.validate(submission.params)
    record = new_job_record(
        submission.job_id,
        route.plugin,
        route.version,
        route.method,
        submission.params,
        caller_id,
        submission.idempotency_key,
        submission.callback_url,
        submission.callback_detail,
        # The route is a rollout's side: the rollout chose the version, not the caller.
        split_key=submission.split_key if route.once.other_versions else None,
    )
    if len(record["params"]) > max_params_bytes:  # kept in the store until the job ends
        raise InvalidParams(
            f"a job's params are at most {max_params_bytes} bytes as JSON (jobs.max_params_bytes)"
        )
    await store.submit(submission.job_id, record)
    return submission.job_id


async def queue_job_once(
    store: JobStore,
    idempotency: IdempotencyStore,
    retention: float,
    submission: Submission,
    route: Route,
    caller_id: str | None,
    max_params_bytes: int,
    *,
    version_named: bool = True,
    wanted: str | None = None,
) -> str:
    """``queue_job``, once per idempotency key: a submission with the key of an earlier
    one (the same method, version, caller and params) is that job, its id answered again,
    for ``retention`` seconds (``state.idempotency_retention_ms``, as a keyed call's
    outcome is kept; ``JobExpired`` once that job's record is gone); with other params or
    naming another version it is refused as a keyed call is. Without ``version_named`` (the submission named none) the earlier
    one's version does not matter, as for a keyed call naming none; ``wanted``: the range it
    named (not an exact version), whose versions' records answer it, as a keyed call's. Without a key, or before, every submission queued a job of its own (the
    plugin's result replayed under each new id: the key also goes with the job, to its
    call)."""
    checked_text(caller_id, "caller")  # kept in the record, and in the key's below
    raw_key = submission.idempotency_key
    if raw_key is None:
        return await queue_job(store, submission, route, caller_id, max_params_bytes)
    scope = "\0" if caller_id is None else "\1" + caller_id
    # Not the key of the job's call (plugin, method, caller, key): a record of its own.
    key = digest("submit", route.plugin, route.method, scope, raw_key)
    # The version the job is fixed to is part of the request, kept beside the params'
    # fingerprint (as a keyed call's is): a key used on 1.x and then on 2.x answered 1.x's
    # job to a caller who asked for 2.x.
    fingerprint = digest(encode_json(submission.params, sort_keys=True))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _SUBMIT_WAIT_SECONDS
    # A rollout chose the version (the key's side of its split): a record of the key at
    # its other version is the same submission, as for a keyed call; and at any version
    # when the submission named none.
    other_versions = route.once.other_versions if version_named else (ANY_VERSION,)
    while True:
        try:
            claimed = await idempotency.claim(
                key,
                fingerprint,
                _SUBMIT_WAIT_SECONDS,
                deadline,
                version=route.version,
                other_versions=other_versions,
            )
        except StateUnavailable:
            # No record answers it, and no job is queued without the store: params no
            # schema takes are told first, as a keyed call's are (``IdempotencyStep``).
            if route.validate is not None:
                route.validate(submission.params)
            raise
        if claimed.claim is Claim.RUN:
            break
        if claimed.claim is Claim.DONE and claimed.outcome is not None:
            return await kept_job_id(store, recorded_job_id(claimed.outcome, raw_key), raw_key)
        if claimed.claim is Claim.MISMATCH:
            widened = with_range_version(claimed, wanted, other_versions)
            if widened is not None:  # the record is at a version the named range takes
                other_versions = widened
                continue
            versions = " or ".join((route.version, *route.once.other_versions))
            other = f" or at another version than {versions}" if version_named else ""
            raise InvalidParams(
                f"idempotency key {raw_key!r:.80} was already used for {route.plugin}."
                f"{route.method} with other params{other}; a new request needs a new key"
            )
        left = deadline - loop.time()
        if left <= 0:
            raise DeadlineExceeded(
                f"the first submission of {route.plugin}.{route.method} with idempotency key"
                f" {raw_key!r:.80} was not queued within {_SUBMIT_WAIT_SECONDS:g} s: submit again",
                retryable=True,
            )
        await idempotency.changed(key, min(_SUBMIT_POLL_SECONDS, left))
    try:
        job_id = await queue_job(store, submission, route, caller_id, max_params_bytes)
    except BaseException:
        with contextlib.suppress(StateUnavailable):
            await idempotency.release(key, claimed.token, math.inf)
        raise
    # Not kept (the store failed after the job was queued): the job stands; a submission
    # again after the claim's lease may queue another.
    with contextlib.suppress(StateUnavailable):
        await idempotency.complete(key, claimed.token, encode_result(job_id), retention, math.inf)
    return job_id


async def kept_job_id(store: JobStore, job_id: str, raw_key: str) -> str:
    """``job_id``, the job a repeated submission's key names, if its record is still kept;
    else ``JobExpired``. Not that id: it answered ``JobNotFound`` from then on. Nor a new
    job: the key's record promises one job per key for its retention, and a second would
    run again what the first ran (a job's call holds the key too, but its record is
    given back by a retryable failure, and a dead-lettered job ended on those). The
    caller is told its job is gone, and that a new request needs a new key."""
    if await store.kept(job_id):
        return job_id
    raise JobExpired(
        f"idempotency key {raw_key!r:.80} names job {job_id}, whose record is no longer"
        " kept (it expired, or was evicted or purged); its outcome is gone and it is not"
        " queued again: a new request needs a new key",
        details={"stage": "jobs", "job_id": job_id},
    )


def recorded_job_id(outcome: bytes, raw_key: str) -> str:
    """The job id a submission's idempotency record holds; ``ProviderError``, final, for
    any record a dispatcher does not write: one holds the id it queued, nothing else. An
    error or a size read as the call's outcome (``decode_outcome``) answered a record that
    stays as it is as retryable ("come again", for ever) or as a result too large; an id
    no dispatcher makes went out as the job's ``Location``, a line break in it a header
    of the forger's (the gateway failed the request with a traceback). A record done is
    done: waiting for it to change would end in a deadline that says to submit again,
    which meets the same record."""
    try:
        document = orjson.loads(outcome)
    except orjson.JSONDecodeError:
        document = None
    job_id = document.get("result") if isinstance(document, dict) and document.get("ok") else None
    if isinstance(job_id, str) and _JOB_ID.match(job_id):
        return job_id
    raise ProviderError(
        f"the job recorded for idempotency key {raw_key!r:.80} in the state store is not one"
        " a dispatcher wrote (no job id); the job it records may have been queued, so none"
        " is queued again: a new request needs a new key",
        details={"stage": "state"},
    )


def checked_job_id(job_id: object) -> str:
    if isinstance(job_id, str) and 0 < len(job_id) <= 64 and job_id.isprintable():
        return job_id
    raise InvalidParams(f"a job id is a string of 1 to 64 printable characters, got {job_id!r:.40}")


async def job_status(store: JobStore, job_id: object) -> dict[str, Any]:
    """The status record of a job: its fields as stored, JSON ones decoded."""
    record = await store.record(checked_job_id(job_id))
    if record is None:
        raise _not_found(job_id)
    return decoded_status(record)


async def owned_job_status(store: JobStore, job_id: object, caller: str | None) -> dict[str, Any]:
    """``job_status`` for ``caller``, who reads only the jobs it submitted (None: those
    submitted anonymously). Another caller's job is ``JobNotFound``, as one that does not
    exist, so ids cannot be probed; the store compares the owner first
    (``JobStore.owned_record``), and only the owner's record is decoded: another caller's
    params and result, up to the store's bounds, cost the reader nothing to refuse."""
    checked_text(caller, "caller")
    record = await store.owned_record(checked_job_id(job_id), caller)
    if record is None:
        raise _not_found(job_id)
    return decoded_status(record)


async def job_result(
    store: JobStore, job_id: object, wait: float, clock: Callable[[], float]
) -> Any:
    """The result of a job (or its error, raised typed), waiting up to ``wait`` seconds for
    it to end; ``JobNotFinished`` when it has not."""
    job_id = checked_job_id(job_id)
    deadline = clock() + checked_timeout(wait, "waiting for a job") if wait else 0.0
    while True:
        record = await store.record(job_id)
        if record is None:
            raise _not_found(job_id)
        if record.get("state") in TERMINAL_STATES:
            return job_outcome(record)
        left = deadline - clock()
        if left <= 0:
            raise JobNotFinished(
                f"job {job_id} is {record.get('state')} after {record.get('attempts')} "
                "attempts; ask again later",
                details={"state": record.get("state")},
            )
        # Woken when a worker stores its end; polled too, for a missed notification.
        await store.changed(job_id, min(left, _POLL_SECONDS))


def _not_found(job_id: object) -> JobNotFound:
    return JobNotFound(f"no job {job_id!r:.80}: never submitted, or its record expired")
