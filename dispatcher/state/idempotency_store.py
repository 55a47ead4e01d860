"""Idempotency records (``IdempotencyStore``): who runs a keyed call, and what it
returned, kept as bytes every backend stores alike (``encode_result``, ``encode_error``,
``decode_outcome``). The step that uses them is ``dispatcher.policies.idempotency``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from linchkit_plugin.errors import DispatchError, ProviderError, error_from_wire
from linchkit_plugin.wire import encode_json, error_response
from providers.base import ResultTooLarge

__all__ = [
    "ANY_VERSION",
    "Claim",
    "Claimed",
    "IdempotencyStore",
    "decode_outcome",
    "encode_error",
    "encode_result",
    "encode_too_large",
]


class Claim(Enum):
    RUN = "run"  # this call owns the key: run it, then complete or release
    DONE = "done"  # an earlier call finished: its outcome is in ``Claimed.outcome``
    BUSY = "busy"  # another call owns the key and runs now: wait, then claim again
    MISMATCH = "mismatch"  # the key was used with other params, or at another version


@dataclass(frozen=True, slots=True)
class Claimed:
    claim: Claim
    token: str = ""
    outcome: bytes | None = None
    #: ``MISMATCH`` for the version alone (the params' fingerprint is the same): the version
    #: the record is at, for a call that named a range to tell whether the range takes it.
    version: str | None = None


def encode_result(result: Any) -> bytes:
    return encode_json({"ok": True, "result": result})


def encode_error(error: DispatchError) -> bytes:
    # error_response leaves out details JSON cannot carry (a local plugin's NaN), which
    # would have raised here and replaced the caller's error with one about params.
    return encode_json(error_response(error))


def encode_too_large(size: int, limit: int) -> bytes:
    """What a store records of an outcome of ``size`` bytes, over the ``limit`` it keeps:
    that the call ran, and its size. Neither a result nor an error a plugin could give."""
    return encode_json({"ok": False, "too_large": size, "limit": limit})


def decode_outcome(outcome: bytes, what: str = "a stored outcome") -> Any:
    """The stored result, or raise the stored error (a fresh exception per caller).

    An outcome recorded by its size only (``encode_too_large``) raises ``ResultTooLarge``.
    One no dispatcher wrote (not a JSON object: another writer's, or corrupted) raises
    ``ProviderError``. Both name ``what``: the call the record stands for may have run,
    and what it returned is not there, so it is not run again under the same record."""
    try:
        document = orjson.loads(outcome)
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        raise ProviderError(
            f"{what} in the state store is not one a dispatcher wrote (not a JSON object);"
            " the call it records may have run, so it does not run again: a new request"
            " needs a new key",
            details={"stage": "state"},
        )
    if "too_large" in document:
        size, limit = document.get("too_large"), document.get("limit")
        raise ResultTooLarge(
            f"{what}: the call ran, and its result, {size} bytes, is over the {limit} bytes a"
            " shared record keeps; it does not run again: a new request needs a new key",
            details={"stage": "state", "bytes": size, "limit": limit},
        )
    if document.get("ok"):
        return document.get("result")
    raise error_from_wire(document.get("error"))


#: In ``other_versions`` of a claim: a record at any version answers it (the call named
#: none). Never a version: a manifest's versions are semantic versions.
ANY_VERSION = "*"


class IdempotencyStore(ABC):
    """Records of calls made with an idempotency key: who runs it, and what it returned."""

    @abstractmethod
    async def claim(
        self,
        key: str,
        fingerprint: str,
        lease: float,
        deadline: float,
        *,
        version: str,
        other_versions: tuple[str, ...] = (),
    ) -> Claimed:
        """Own ``key`` for ``lease`` seconds (a crashed owner's claim ends then), or say
        why not. ``fingerprint`` stands for the request's params and ``version`` for the
        version it runs at, kept beside it in the record: a record with another
        fingerprint, or at another version than ``version`` and ``other_versions``, is
        ``MISMATCH`` (``ANY_VERSION`` among them: at any version, only the fingerprint
        counts), the record's version in ``Claimed.version`` when the fingerprint is the
        same. ``deadline`` (the loop's clock) bounds the operation."""

    @abstractmethod
    async def complete(
        self, key: str, token: str, outcome: bytes, retention: float, deadline: float
    ) -> None:
        """Keep ``outcome`` for ``retention`` seconds and wake the calls waiting for it.
        ``deadline`` may be ``math.inf``: the backend's own operation timeout bounds it."""

    @abstractmethod
    async def release(self, key: str, token: str, deadline: float) -> None:
        """Give the key up without an outcome (the call never ran, or may run again);
        ``deadline`` as for ``complete``."""

    @abstractmethod
    async def changed(self, key: str, timeout: float) -> None:
        """Return when ``key`` may have changed, or after ``timeout`` seconds."""
