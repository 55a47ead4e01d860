"""Compressed envelopes over HTTP: what a target accepts, learned; what it answers, decoded.

``compression: {min_bytes, algorithms, peer_accepts}`` of an http or knative target
(``HttpCompression``). Both providers post through ``post_compressed``, so both clients of
the seam (aiohttp and reqwest, ``providers._http_client``; neither decodes by itself) get
the same behaviour:

* **Requests.** Every request says ``Accept-Encoding`` (the codings of ``algorithms`` this
  dispatcher decodes). A body of ``min_bytes`` or more is sent with ``Content-Encoding``
  only to a peer known to accept it: one that listed the coding in the ``Accept-Encoding``
  of its last answer (the SDKs' servers do), or one the manifest vouches for
  (``peer_accepts``). A peer that never said so gets plain bytes. Without ``min_bytes``
  the threshold is ``DEFAULT_MIN_BYTES``, and a peer on a loopback address gets neither
  compressed bodies nor ``Accept-Encoding``: measured, compression never paid there. A peer that refuses a
  compressed body with 415 (redeployed without it) is forgotten and the call resent plain
  once: a 415 is decided before the plugin runs.
* **Answers.** A ``Content-Encoding`` answer is decoded with its output capped at the
  target's ``max_response_bytes``: a bomb, a lying or unknown coding, or a cut-short body is
  a ``ProviderError`` naming the target, never a memory blow-up.

Bodies over ``_OFF_LOOP_BYTES`` are compressed and decoded in a worker thread (zlib and
zstandard release the GIL), so a 10 MB envelope does not stall every other call.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping
from typing import Literal

from pydantic import Field

from linchkit_plugin.encodings import SUPPORTED, UndecodableBody, accepted
from linchkit_plugin.encodings import decode as decode_body
from linchkit_plugin.encodings import encode as encode_body
from linchkit_plugin.errors import ProviderError
from providers._http_client import HttpClient, Reply
from providers.target import StrictModel, TargetConfig
from providers.tls import ClientTlsContext

__all__ = [
    "DEFAULT_MIN_BYTES",
    "Coding",
    "HttpCompression",
    "Negotiation",
    "decoded",
    "is_loopback",
    "post_compressed",
    "request_headers",
]

Coding = Literal["zstd", "gzip"]
_EVERY_CODING: tuple[Coding, ...] = ("zstd", "gzip")

#: Bodies below this go plain, when ``min_bytes`` is not set. From bench/bench_compression.py
#: (README, "Compression"): through a 100 Mbit/s link compressing paid from 10 KB (zstd
#: 0.61x, gzip 0.81x the time of a plain call) and lost at 1 KB; 32 KiB keeps the small
#: calls of the hot path free of any cost while the envelopes that dominate a slow link's
#: time go compressed.
DEFAULT_MIN_BYTES = 32 * 1024
#: Above this, compression and decoding run in a worker thread.
_OFF_LOOP_BYTES = 256 * 1024


class HttpCompression(StrictModel):
    """``compression:`` of an http or knative target."""

    min_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Request bodies this large or larger are compressed (where the peer"
        " accepts it). Unset: 32 KiB, and off altogether to a loopback address, where"
        " compression never paid (bench_compression).",
    )
    algorithms: list[Coding] = Field(
        default_factory=lambda: list(_EVERY_CODING),
        description="Codings this target may use, preferred first; [] turns compression off"
        " both ways. zstd needs the zstandard package (the `zstd` extra).",
    )
    peer_accepts: list[Coding] = Field(
        default_factory=list,
        description="Codings the plugin accepts without having said so in Accept-Encoding.",
    )


class Negotiation:
    """One route's codings: what it offers, and the one its peer is known to accept."""

    __slots__ = ("_seen", "_vouched", "accept_encoding", "chosen", "min_bytes", "offered")

    def __init__(self, compression: HttpCompression, *, host: str) -> None:
        """``host``: the peer's host, from its URL (a loopback one turns the default off)."""
        off = compression.min_bytes is None and is_loopback(host)
        self.offered: tuple[str, ...] = tuple(
            coding for coding in compression.algorithms if coding in SUPPORTED and not off
        )
        self.min_bytes = (
            DEFAULT_MIN_BYTES if compression.min_bytes is None else compression.min_bytes
        )
        self._vouched = next((c for c in self.offered if c in compression.peer_accepts), None)
        #: The coding large requests go in; None: plain (the peer never said it accepts one).
        self.chosen: str | None = self._vouched
        self._seen: str | None = None
        #: What our requests say we decode; None: nothing (compression is off).
        self.accept_encoding = ", ".join(self.offered) or None

    def learn(self, header: str | None) -> None:
        """Take in the ``Accept-Encoding`` of an answer (parsed only when it changes)."""
        if header == self._seen:
            return
        self._seen = header
        codings = accepted(header)
        self.chosen = next((c for c in self.offered if c in codings), self._vouched)

    def compresses(self, size: int) -> bool:
        """Whether a request body of ``size`` bytes goes compressed (``post_compressed``)."""
        return self.chosen is not None and size >= self.min_bytes

    def answered_plain(self, reply: Reply) -> bool:
        """Take in the ``Accept-Encoding`` of ``reply``; whether its body is plain (else
        ``decoded`` decodes it)."""
        headers = reply.headers
        self.learn(headers.get("Accept-Encoding"))
        return headers.get("Content-Encoding") is None

    def forget(self) -> None:
        """The peer refused a compressed body: send plain until it says otherwise again."""
        self.chosen = None
        self._vouched = None

    def __repr__(self) -> str:
        return (
            f"<Negotiation offered={self.offered} chosen={self.chosen} min_bytes={self.min_bytes}>"
        )


async def post_compressed(
    client: HttpClient,
    negotiation: Negotiation,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout: float,
    limit: int,
    target: TargetConfig,
    tls: ClientTlsContext | None,
) -> Reply:
    """POST through ``client``, compressing ``body`` where it pays; the answer decoded.

    ``HttpProvider.invoke`` writes out the path of a body that goes plain (most calls):
    ``client.post``, then ``answered_plain`` and, rarely, ``decoded``.
    """
    coding = negotiation.chosen
    if coding is not None and negotiation.compresses(len(body)):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        packed = await _encode(body, coding)
        reply = await client.post(
            url,
            packed,
            {**headers, "Content-Encoding": coding},
            timeout=_left(deadline, loop),
            limit=limit,
            target=target,
            tls=tls,
        )
        if reply.status != 415:
            if negotiation.answered_plain(reply):
                return reply
            return await decoded(reply, negotiation, limit, target)
        negotiation.forget()  # a 415 is decided before the plugin runs: resend plain
        timeout = _left(deadline, loop)
    reply = await client.post(
        url, body, headers, timeout=timeout, limit=limit, target=target, tls=tls
    )
    if negotiation.answered_plain(reply):
        return reply  # a small plain answer: no further await
    return await decoded(reply, negotiation, limit, target)


def _left(deadline: float, loop: asyncio.AbstractEventLoop) -> float:
    """Seconds until ``deadline``; ``TimeoutError`` (the seam's deadline) if none are left."""
    left = deadline - loop.time()
    if left <= 0:
        raise TimeoutError
    return left


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def request_headers(headers: dict[str, str], negotiation: Negotiation) -> dict[str, str]:
    """``headers`` with the ``Accept-Encoding`` of ``negotiation`` (none when it is off)."""
    if negotiation.accept_encoding is None:
        return headers
    return {**headers, "Accept-Encoding": negotiation.accept_encoding}


async def decoded(
    reply: Reply, negotiation: Negotiation, limit: int, target: TargetConfig
) -> Reply:
    """``reply`` with its ``Content-Encoding`` body decoded, at most ``limit`` bytes of it;
    a coding this target did not offer, a bomb or a broken body is a ``ProviderError``."""
    headers = reply.headers
    coding = headers.get("Content-Encoding")
    if coding is None:
        return reply
    if coding.strip().lower() not in negotiation.offered and coding.strip().lower() != "identity":
        raise ProviderError(
            f"{target.describe()} answered in Content-Encoding {coding[:40]!r}, which this"
            f" target did not offer (Accept-Encoding: {negotiation.accept_encoding or 'none'})"
        )
    try:
        if len(reply.body) > _OFF_LOOP_BYTES // 8:
            body = await asyncio.to_thread(decode_body, reply.body, coding, limit)
        else:
            body = decode_body(reply.body, coding, limit)
    except UndecodableBody as error:
        detail = (
            f"more than max_response_bytes={limit} once decompressed"
            if error.kind == "too_large"
            else error.message
        )
        raise ProviderError(
            f"{target.describe()} answered a body that cannot be decoded: {detail}",
            details={"encoding": coding[:40], "reason": error.kind},
        ) from None
    return Reply(reply.status, headers, body)


async def _encode(body: bytes, coding: str) -> bytes:
    if len(body) > _OFF_LOOP_BYTES:
        return await asyncio.to_thread(encode_body, body, coding)
    return encode_body(body, coding)
