"""Content codings of the HTTP binding (``docs/protocol.md``): gzip, and zstd where installed.

Shared by both ends: the plugin's HTTP server (``linchkit_plugin.asgi``) and the
dispatcher's HTTP providers (``providers._compression``). gzip is the standard library's
zlib; zstd is the ``zstandard`` package (the ``zstd`` extra), imported when first used and
offered only where it imports.

Decoding never holds more than ``limit`` bytes of output (plus one), whatever the input
claims, so a small body that expands without end (a compression bomb) costs at most the
limit in memory and is refused:

    UndecodableBody(kind="unknown")    a coding this side does not speak (HTTP 415)
    UndecodableBody(kind="too_large")  more than ``limit`` bytes once decoded (HTTP 413)
    UndecodableBody(kind="corrupt")    not valid in the coding it names, or cut short (400)

Each caller turns these into its own typed answer: a status on the plugin's server, a
``ProviderError`` in the dispatcher.
"""

from __future__ import annotations

import importlib.util
import threading
import zlib
from typing import Any, Literal

__all__ = [
    "ACCEPT_ENCODING",
    "SUPPORTED",
    "UndecodableBody",
    "accepted",
    "decode",
    "encode",
]

Kind = Literal["unknown", "too_large", "corrupt"]

#: The codings this side can decode, preferred first: zstd (faster at a better ratio,
#: bench/bench_compression.py) only where ``zstandard`` is installed.
SUPPORTED: tuple[str, ...] = (
    ("zstd", "gzip") if importlib.util.find_spec("zstandard") is not None else ("gzip",)
)
#: The ``Accept-Encoding`` value each side sends: what it can decode.
ACCEPT_ENCODING = ", ".join(SUPPORTED)

#: gzip at level 1 and zstd at level 3: the fastest settings that still shrink JSON
#: envelopes 4-10x; compression only pays where it costs less than the bytes it saves.
_GZIP_LEVEL = 1
_ZSTD_LEVEL = 3
#: zstd frames asking for a larger window are refused: the window is memory the decoder
#: allocates before it writes a byte (8 MiB is what RFC 8878 asks every decoder to accept).
_ZSTD_MAX_WINDOW = 8 * 1024 * 1024


class UndecodableBody(Exception):
    """A body that cannot be decoded within the limit; ``kind`` says why."""

    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(message)
        self.kind: Kind = kind
        self.message = message


def accepted(header: str | None) -> tuple[str, ...]:
    """The codings of ``SUPPORTED`` an ``Accept-Encoding`` value admits, preferred first.

    ``q=0`` excludes a coding; ``*`` admits every one not named. Malformed parts are skipped.
    """
    if not header:
        return ()
    named: dict[str, bool] = {}
    for part in header.split(","):
        coding, _, parameters = part.partition(";")
        coding = coding.strip().lower()
        if coding:
            named[coding] = not _q_is_zero(parameters)
    star = named.get("*", False)
    return tuple(coding for coding in SUPPORTED if named.get(coding, star))


def encode(data: bytes, coding: str) -> bytes:
    """``data`` in ``coding`` (one of ``SUPPORTED``)."""
    if coding == "gzip":
        compressor = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: gzip framing
        return compressor.compress(data) + compressor.flush()
    if coding == "zstd":
        return _zstd_contexts().compressor.compress(data)  # type: ignore[no-any-return]
    raise UndecodableBody("unknown", f"cannot encode in {coding!r}")


def decode(data: bytes, coding: str, limit: int) -> bytes:
    """``data`` decoded from ``coding``, at most ``limit`` bytes; ``UndecodableBody`` else."""
    name = coding.strip().lower()
    if name in ("", "identity"):
        if len(data) > limit:
            raise UndecodableBody("too_large", f"the body is over {limit} bytes")
        return data
    if name not in SUPPORTED:
        shown = coding[:40]
        raise UndecodableBody(
            "unknown",
            f"Content-Encoding {shown!r} is not one this side decodes (it takes {ACCEPT_ENCODING})",
        )
    if name == "gzip":
        return _gunzip(data, limit)
    return _unzstd(data, limit)


def _q_is_zero(parameters: str) -> bool:
    for parameter in parameters.split(";"):
        key, _, value = parameter.partition("=")
        if key.strip().lower() == "q":
            try:
                return float(value) <= 0
            except ValueError:
                return True
    return False


def _too_large(limit: int) -> UndecodableBody:
    return UndecodableBody("too_large", f"the body is over {limit} bytes once decompressed")


def _gunzip(data: bytes, limit: int) -> bytes:
    """gzip members one after another (RFC 1952 allows several), output capped at ``limit``."""
    parts: list[bytes] = []
    size = 0
    rest = data
    try:
        while True:
            decompressor = zlib.decompressobj(31)
            # max_length bounds what zlib writes in this call: a bomb stops at limit + 1.
            part = decompressor.decompress(rest, limit - size + 1)
            size += len(part)
            if size > limit:
                raise _too_large(limit)
            if not decompressor.eof:
                raise UndecodableBody("corrupt", "the gzip body is cut short")
            parts.append(part)
            rest = decompressor.unused_data
            if not rest:
                return b"".join(parts)
    except zlib.error as error:
        raise UndecodableBody("corrupt", f"the body is not valid gzip: {error}") from None


def _unzstd(data: bytes, limit: int) -> bytes:
    """One zstd frame, output capped at ``limit`` (first by the size the frame declares)."""
    zstandard = _zstd()
    try:
        declared = zstandard.frame_content_size(data)
        decompressor = _zstd_contexts().decompressor
        if declared > limit:
            raise _too_large(limit)
        if declared < 0:
            # No size in the header: read at most limit + 1 bytes to learn the size before
            # decoding whole (the one-shot decoder below has no output bound of its own).
            probe = decompressor.stream_reader(data, read_across_frames=False).read(limit + 1)
            if len(probe) > limit:
                raise _too_large(limit)
        whole = decompressor.decompressobj()
        output: bytes = whole.decompress(data)
    except zstandard.ZstdError as error:
        raise UndecodableBody("corrupt", f"the body is not valid zstd: {error}") from None
    if not whole.eof:
        raise UndecodableBody("corrupt", "the zstd body is cut short")
    if whole.unused_data:
        raise UndecodableBody("corrupt", "the zstd body has bytes after its frame")
    if len(output) > limit:
        raise _too_large(limit)
    return output


def _zstd() -> Any:
    import zstandard

    return zstandard


class _ZstdContexts(threading.local):
    """zstd contexts, one set per thread (they are not thread-safe), made once.

    Making them costs more than compressing a 1 KB envelope (18 against 4 µs measured).
    """

    def __init__(self) -> None:
        zstandard = _zstd()
        self.compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
        self.decompressor = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)


_contexts: _ZstdContexts | None = None


def _zstd_contexts() -> _ZstdContexts:
    global _contexts  # made on first use, so zstandard is imported only then
    if _contexts is None:
        _contexts = _ZstdContexts()
    return _contexts
