"""A wasm plugin's module file, read and checked against its pin before anything compiles it.

Reading and hashing happen once per attach, on the bytes that are then compiled, so the
file cannot change between the check and its use. The functions it exports are read from
the same bytes (``exported_functions``): a reload that adds a method to an attached
version is checked against them without an instance, on the event loop.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from linchkit_plugin.errors import ProviderError

__all__ = ["ModuleRefused", "PinnedModule", "exported_functions", "read_pinned"]


class ModuleRefused(ProviderError):
    """The module file is missing, unreadable, or not the one the manifest pins."""


@dataclass(frozen=True, slots=True)
class PinnedModule:
    path: Path
    sha256: str
    code: bytes

    def __repr__(self) -> str:
        return f"<PinnedModule {self.path.name} sha256={self.sha256[:12]}… {len(self.code)} bytes>"


def read_pinned(path: Path, sha256: str) -> PinnedModule:
    """The bytes of ``path`` if their SHA-256 is ``sha256``; ``ModuleRefused`` otherwise."""
    try:
        code = path.read_bytes()
    except OSError as error:
        raise ModuleRefused(f"cannot read the wasm module {path}: {error.strerror}") from error
    digest = hashlib.sha256(code).hexdigest()
    if digest != sha256.lower():
        raise ModuleRefused(
            f"the wasm module {path} has SHA-256 {digest}, the manifest pins {sha256.lower()}: "
            "refusing a module that is not the one pinned (rebuild it or update the pin)",
            details={"path": str(path), "expected": sha256.lower(), "actual": digest},
        )
    return PinnedModule(path, digest, code)


#: A core module's preamble: the magic number and version 1 (the only one).
_PREAMBLE = b"\x00asm\x01\x00\x00\x00"
_EXPORT_SECTION = 7
_FUNCTION_EXPORT = 0


def exported_functions(code: bytes) -> frozenset[str] | None:
    """The names of the functions the core module ``code`` exports (its export section,
    the names ``function_exists`` of the runtime finds); the other sections are skipped
    by their sizes, not read. None for a module in WebAssembly's text format (a ``.wat``,
    which the runtime compiles as well), whose exports are not parsed here. ``ModuleRefused``
    when ``code`` is not a well-formed module this far."""
    if _text_format(code):
        return None
    if not code.startswith(_PREAMBLE):
        raise ModuleRefused("the wasm module is not a core WebAssembly module (version 1)")
    view = memoryview(code)
    offset = len(_PREAMBLE)
    try:
        while offset < len(view):
            section = view[offset]
            size, offset = _unsigned(view, offset + 1)
            end = offset + size
            if end > len(view):
                raise ModuleRefused("the wasm module ends inside a section")
            if section == _EXPORT_SECTION:
                return _function_names(view[offset:end])
            offset = end
    except IndexError:
        raise ModuleRefused("the wasm module ends inside a section") from None
    return frozenset()


#: What the text format allows before its first ``(``, besides line comments.
_BLANKS = re.compile(rb"\s*")


def _text_format(code: bytes) -> bool:
    """Whether ``code`` is in WebAssembly's text format: a ``(`` (of the module, or of a
    block comment) after blanks and line comments. Not the ``(`` first alone: a ``.wat``
    that begins with a line comment (a licence header) compiles all the same, and was
    refused at attach as no core module after the runtime had compiled it. Linear: each
    comment is skipped by one search for its line's end."""
    at = 0
    while True:
        blanks = _BLANKS.match(code, at)
        at = at if blanks is None else blanks.end()
        if not code.startswith(b";;", at):
            return code.startswith(b"(", at)
        at = code.find(b"\n", at)
        if at < 0:
            return False  # a comment and nothing else


def _function_names(section: memoryview) -> frozenset[str]:
    count, offset = _unsigned(section, 0)
    names: set[str] = set()
    for _ in range(count):
        length, offset = _unsigned(section, offset)
        name = bytes(section[offset : offset + length])
        offset += length
        kind = section[offset]
        _, offset = _unsigned(section, offset + 1)  # the function's (or table's...) index
        if kind == _FUNCTION_EXPORT:
            try:
                names.add(name.decode())
            except UnicodeDecodeError:
                raise ModuleRefused("the wasm module exports a name that is not UTF-8") from None
    if offset != len(section):
        raise ModuleRefused("the wasm module's export section does not add up")
    return frozenset(names)


def _unsigned(data: memoryview, offset: int) -> tuple[int, int]:
    """The unsigned LEB128 number at ``offset`` (32 bits at most) and where it ends."""
    value = 0
    for shift in range(0, 35, 7):
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
    raise ModuleRefused("the wasm module holds a number longer than 32 bits")
