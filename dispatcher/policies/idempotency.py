"""Idempotency keys: a call made with ``idempotency_key`` runs at most once.

The outermost step of every chain (before the cache: a keyed call is a request to do
something once, not a lookup). A call without a key passes straight through: the step
returns the next step's awaitable, adding no coroutine to the hot path.

With a key, the record ``(plugin, method, caller, key)`` is claimed in the state backend
(this process with ``memory``; every replica with ``redis``) for as long as the call may
run (its deadline, plus a margin), then completed with the call's outcome, kept for
``idempotency_retention_ms``. Meanwhile:

* a duplicate (same key, same version, same params: a hash of the params' canonical JSON,
  and the version kept beside it in the record) waits for the first call's outcome and
  gets it, result or error — within its own deadline;
* the same key with other params, or naming another version of the method, is refused
  with ``InvalidParams``: a version asked for is another request (its code, its schema),
  so it neither replays the first version's outcome nor runs under a key already spent;
* a duplicate after the outcome gets it at once, without calling the target.

A record an older dispatcher wrote (before 2026-12-05) has no version: it replays for the
same params, as it did then (``state._scripts.IDEMPOTENCY_CLAIM`` says until when).

A call that named no version is answered from its key's record at any version of the
method (``ANY_VERSION``): the dispatcher chose the version, not the caller, and its retry
after a newer version was deployed, or after a rollout that placed it left the manifest,
is the same request (before 2026-12-05 it was refused). A call a rollout routed for a
range both its versions satisfy is answered from a record at either of them
(``other_versions``), as is a retry that lands on the other side (the split moved, or
rolled back). The rollout sends a key's calls to one side while its split holds.

A first call that provably never reached the plugin (refused by a limit, a bulkhead or a
breaker, a connection that never opened, the state store itself), or that failed with a
retryable error, gives its key back, so the caller (or a job's next attempt) may try again
with it and the try runs: retrying a retryable failure must not replay it. (AWS Lambda
Powertools' idempotency does the same: a failed run deletes its record.) A non-retryable
failure is the call's answer, kept and replayed like a result. A first call cancelled by its caller keeps the key until
its lease ends (it may have reached the plugin), then the key is free. The key is scoped
per caller, so one caller's key never hands out another caller's result.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from dispatcher._versions import in_range
from dispatcher.state import (
    ANY_VERSION,
    Claim,
    Claimed,
    IdempotencyStore,
    StateBackend,
    StateUnavailable,
    decode_outcome,
    digest,
    encode_error,
    encode_result,
)
from linchkit_plugin.errors import (
    CircuitOpen,
    DeadlineExceeded,
    DispatchError,
    InvalidParams,
    Overloaded,
    RateLimited,
)
from linchkit_plugin.wire import encode_json
from providers.invocation import Invocation

__all__ = [
    "MAX_KEY_LENGTH",
    "IdempotencyStep",
    "KeyedCalls",
    "Refused",
    "checked_idempotency_key",
]

Next = Callable[[Invocation], Awaitable[Any]]
#: A method's params check (its ``params_schema``): raises ``InvalidParams``.
Validate = Callable[[Any], None]


class KeyedCalls:
    """What one method's keyed calls were answered without running, in this replica:
    ``replayed`` from their key's record (the first call had ended, here or on another
    replica), ``joined`` by waiting for the same key's call in flight here. Shared by the
    steps a rollout or a shadow puts around the method's chain (``around``)."""

    __slots__ = ("joined", "replayed")

    def __init__(self) -> None:
        self.replayed = 0
        self.joined = 0


class Refused(Protocol):
    """Where a call this step refuses is counted, as a call refused before its chain is
    (``TelemetryRuntime.refused``)."""

    def __call__(self, plugin: str, method: str, error: DispatchError, /) -> None: ...


#: How long past its deadline a claim outlives a first call that never ended it.
LEASE_MARGIN_SECONDS = 1.0
#: Waiters look again at least this often, even if no notification came.
POLL_SECONDS = 0.1
#: The longest idempotency key, in characters (``checked_idempotency_key``).
MAX_KEY_LENGTH = 255
#: The deadline of the writes after a call has its outcome: none, so the backend's
#: operation timeout alone bounds them (the call's deadline may have passed while its
#: outcome is worth keeping).
NO_DEADLINE = math.inf
_NEVER_RAN = (RateLimited, CircuitOpen, Overloaded, StateUnavailable)


def checked_idempotency_key(key: object, name: str = "idempotency_key") -> str:
    """``key`` if it is a string of 1 to ``MAX_KEY_LENGTH`` printable characters; else the
    refusal, naming the argument, header or field (``name``) it came in. The one rule of
    every surface: a keyed call, a submission, the gateway's header and its gRPC field. A
    call and a submission are two requests under one key's promise (a job's call carries
    its key), and a call accepted where a submission, or the gateway, refused the same key
    made one surface's key the other's error; a control character would also reach the
    plugin's context, the stores and the audit log. A lone surrogate is not printable
    either: no store could encode it."""
    if isinstance(key, str) and 0 < len(key) <= MAX_KEY_LENGTH and key.isprintable():
        return key
    raise InvalidParams(f"{name} is 1-{MAX_KEY_LENGTH} printable UTF-8 characters")


def never_ran(error: DispatchError) -> bool:
    return isinstance(error, _NEVER_RAN) or error.details.get("stage") in ("connect", "refused")


def with_range_version(
    claimed: Claimed, wanted: str | None, other_versions: tuple[str, ...]
) -> tuple[str, ...] | None:
    """``other_versions`` and the version of the record a claim ``MISMATCH``ed on, when the
    range ``wanted`` the call or submission named takes that version (the same request:
    the range was the caller's, the version the dispatcher's choice); None when the
    mismatch stands (other params, no range, a version outside it)."""
    recorded = claimed.version
    if wanted is None or recorded is None or recorded in other_versions:
        return None
    return (*other_versions, recorded) if in_range(recorded, wanted) else None


class IdempotencyStep:
    __slots__ = (
        "backend",
        "counts",
        "local",
        "name",
        "next",
        "other_versions",
        "refused",
        "retention",
        "validate",
    )

    def __init__(
        self,
        name: str,
        backend: StateBackend,
        retention: float,
        next_step: Next,
        other_versions: tuple[str, ...] = (),
        validate: Validate | None = None,
        refused: Refused | None = None,
        counts: KeyedCalls | None = None,
    ):
        self.name = name
        #: Calls answered without running (telemetry reads them from ``stats()``).
        self.counts = counts if counts is not None else KeyedCalls()
        self.backend = backend
        self.retention = retention
        self.next = next_step
        #: This step is outside the chain's telemetry (``CallStep``), which counts what
        #: ``next`` raises: the calls it refuses itself are counted here (None: no
        #: telemetry). A replayed outcome is not a refusal, nor counted again.
        self.refused = refused
        #: Versions besides the call's own whose record answers it too: a rollout's
        #: other side, for the calls the rollout routes.
        self.other_versions = other_versions
        #: The route's params check, made once the key's record is read (a keyed call's
        #: params are not checked before it): a record answers the retry it stands for,
        #: whatever the schema of the version the retry reached (the record may be at
        #: another, ``other_versions``); a call that runs is checked before it runs.
        self.validate = validate
        #: This replica's calls per record, ``[fingerprint, shared]``: its duplicates share
        #: one claim. ``shared`` is None until a duplicate joins (most calls have none),
        #: then the future the duplicates wait on. A step serves one route, so one version:
        #: the fingerprint of its params tells its duplicates apart.
        self.local: dict[str, list[Any]] = {}

    def around(
        self,
        next_step: Next,
        other_versions: tuple[str, ...] = (),
        validate: Validate | None = None,
    ) -> IdempotencyStep:
        """This step in front of ``next_step`` (the chain as a rollout or a shadow wraps
        it), answering also from records at ``other_versions``, checking params with
        ``validate`` (None: this step's check)."""
        return IdempotencyStep(
            self.name,
            self.backend,
            self.retention,
            next_step,
            other_versions,
            self.validate if validate is None else validate,
            self.refused,
            self.counts,
        )

    def __call__(self, invocation: Invocation) -> Awaitable[Any]:
        if invocation.idempotency_key is None:
            return self.next(invocation)
        return self._once(invocation, invocation.idempotency_key)

    def in_range(self, wanted: str, invocation: Invocation) -> Awaitable[Any]:
        """A call that named the range ``wanted`` (``Route.keyed``): also answered from its
        key's record at any version the range takes. The dispatcher chose the version in
        it, as for a call naming none: a retry after a newer version in the range was
        deployed is the same request, and the record's version was one the caller took."""
        if invocation.idempotency_key is None:
            return self.next(invocation)
        return self._once(invocation, invocation.idempotency_key, wanted)

    async def _once(self, invocation: Invocation, raw_key: str, wanted: str | None = None) -> Any:
        checked_idempotency_key(raw_key)  # a keyed call only: no cost to the others
        caller = invocation.caller
        key = digest(
            invocation.plugin,
            invocation.method,
            "\0" if caller is None else "\1" + caller,
            raw_key,
        )
        # The params' alone: the version the call resolved to is kept beside it in the
        # record (a key used on 1.x and then on 2.x replayed 1.x's outcome to a caller who
        # asked for 2.x), where a replica comparing fingerprints only still reads it.
        fingerprint = digest(encode_json(invocation.params, sort_keys=True))
        while True:
            mine = self.local.get(key)
            if mine is None:
                break
            if mine[0] != fingerprint:
                raise self._told(invocation, self._mismatch(raw_key, invocation.version))
            shared = mine[1]
            if shared is None:
                shared = mine[1] = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(max(invocation.remaining(), 0.0)):
                    result = await asyncio.shield(shared)
                self.counts.joined += 1
                return result
            except DispatchError:
                self.counts.joined += 1  # the first call's answer, an error: this one's too
                raise
            except TimeoutError:
                raise self._told(invocation, self._late(raw_key)) from None
            except _LeaderGone:
                continue
        mine = self.local[key] = [fingerprint, None]
        try:
            result = await self._claim_and_run(invocation, key, fingerprint, raw_key, wanted)
        except BaseException as error:
            del self.local[key]
            shared = mine[1]
            if shared is not None:
                gone = isinstance(error, asyncio.CancelledError)
                shared.set_exception(_LeaderGone() if gone else error)
                shared.exception()
            raise
        del self.local[key]
        shared = mine[1]
        if shared is not None:
            shared.set_result(result)
        return result

    async def _claim_and_run(
        self,
        invocation: Invocation,
        key: str,
        fingerprint: str,
        raw_key: str,
        wanted: str | None = None,
    ) -> Any:
        store: IdempotencyStore = self.backend.idempotency
        other_versions = self.other_versions
        while True:
            lease = max(invocation.remaining(), 0.0) + LEASE_MARGIN_SECONDS
            try:
                claimed = await store.claim(
                    key,
                    fingerprint,
                    lease,
                    invocation.deadline,
                    version=invocation.version,
                    other_versions=other_versions,
                )
            except StateUnavailable as error:
                if not self.backend.fail_open or store is self.backend.local_idempotency:
                    # No record can be read, so none answers this call: params no schema
                    # takes are the caller's to fix, whatever the store says, and told
                    # first (a retry with them would only meet the same refusal later).
                    self._check_params(invocation)
                    self._told(invocation, error)
                    raise
                self.backend.fell_back(f"the idempotency record of {self.name}", error)
                store = self.backend.local_idempotency
                continue
            if claimed.claim is Claim.RUN:
                break
            if claimed.claim is Claim.DONE:
                assert claimed.outcome is not None
                self.counts.replayed += 1  # a result or an error, answered as it was kept
                return decode_outcome(
                    claimed.outcome, f"the outcome of idempotency key {raw_key!r:.80}"
                )
            if claimed.claim is Claim.MISMATCH:
                widened = with_range_version(claimed, wanted, other_versions)
                if widened is None:
                    raise self._told(invocation, self._mismatch(raw_key, invocation.version))
                other_versions = widened
                continue
            remaining = invocation.remaining()
            if remaining <= 0:
                raise self._told(invocation, self._late(raw_key))
            await store.changed(key, min(POLL_SECONDS, remaining))
        token = claimed.token
        try:
            self._check_params(invocation)
        except InvalidParams:
            await self._end(store, key, token, None)  # nothing ran: the key is free
            raise
        try:
            result = await self.next(invocation)
        except DispatchError as error:
            # A retryable failure gives the key back, as one that never ran does: the
            # retry it asks for (the caller's, a job's next attempt) must run, not replay
            # the failure. A plugin holding the key (it travels in the call's context)
            # keeps its own effects once. Other failures are the call's answer: kept.
            if never_ran(error) or error.retryable:
                await self._end(store, key, token, None)
            else:
                await self._end(store, key, token, encode_error(error))
            raise
        try:
            outcome = encode_result(result)
        except InvalidParams:
            await self._end(store, key, token, None)  # not JSON: a duplicate may run again
            return result
        try:  # ``_end``, written out: every keyed call that ran ends here
            await store.complete(key, token, outcome, self.retention, NO_DEADLINE)
        except StateUnavailable as error:
            self.backend.fell_back(f"the idempotency record of {self.name}", error)
        return result

    def _check_params(self, invocation: Invocation) -> None:
        if self.validate is not None:
            try:
                self.validate(invocation.params)
            except InvalidParams as error:
                self._told(invocation, error)
                raise

    def _told(self, invocation: Invocation, error: DispatchError) -> DispatchError:
        """``error``, the refusal of ``invocation`` by this step, counted."""
        if self.refused is not None:
            self.refused(invocation.plugin, invocation.method, error)
        return error

    async def _end(
        self, store: IdempotencyStore, key: str, token: str, outcome: bytes | None
    ) -> None:
        """Complete or release the claim before the caller has its answer. An answer that
        left before its record was written would let a duplicate run again if this process
        died in between: a job's worker killed right after the call (its job is then
        delivered again), a caller retrying on another replica. It costs a keyed call one
        round trip to the store. A store that cannot take the record does not fail the
        call, which has run: the claim frees when its lease ends."""
        if outcome is None:
            work = store.release(key, token, NO_DEADLINE)
        else:
            work = store.complete(key, token, outcome, self.retention, NO_DEADLINE)
        try:
            await work
        except StateUnavailable as error:
            self.backend.fell_back(f"the idempotency record of {self.name}", error)

    def _mismatch(self, raw_key: str, version: str) -> InvalidParams:
        if ANY_VERSION in self.other_versions:
            what = "with other params"
        else:
            versions = " or ".join((version, *self.other_versions))
            what = f"with other params or at another version than {versions}"
        return InvalidParams(
            f"idempotency key {raw_key!r:.80} was already used for {self.name} {what};"
            " a new request needs a new key"
        )

    def _late(self, raw_key: str) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"{self.name}: the first call with idempotency key {raw_key!r:.80} did not end "
            "within this call's deadline"
        )

    def __repr__(self) -> str:
        return f"<IdempotencyStep {self.name} in_flight={len(self.local)}>"


class _LeaderGone(Exception):
    """The first call in this replica was cancelled by its caller: claim again."""
