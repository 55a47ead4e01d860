"""Reading a file a setting names (a token, a certificate, a key): bounded, never blocking.

A setting's file is read whole at start, so what it names decides what the start costs.
``/dev/zero`` given as a token file grew the process to gigabytes in seconds, and a FIFO
(or a terminal) blocked the start for ever. Here the file is opened with ``O_NONBLOCK``,
so opening a FIFO with no writer returns at once; it must then be a regular file (fstat),
and is read up to its cap, one byte more telling a file over it. Each refusal is a
``SettingFileRefused`` (an ``OSError``, whose ``strerror`` says why in a few words), which
the caller names its setting in.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = [
    "PEM_FILE_BYTES",
    "TOKEN_FILE_BYTES",
    "SettingFileRefused",
    "check_setting_file",
    "file_kind",
    "read_setting_file",
]

#: The largest token file read: a bearer token is tens of bytes, a JWT a few KB.
TOKEN_FILE_BYTES = 64 * 1024
#: The largest certificate, key or CA bundle read: the system's whole bundle is ~200 KB.
PEM_FILE_BYTES = 4 * 1024 * 1024


class SettingFileRefused(OSError):
    """The file is not one a setting can be read from: not a regular file, or too large."""


def read_setting_file(path: str | Path, *, limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them (else
    ``SettingFileRefused``); any other failure to open or read it is the ``OSError``."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(descriptor, "rb", buffering=0, closefd=True) as file:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise SettingFileRefused(0, f"not a regular file ({file_kind(mode)})")
        blob = file.read(limit + 1)  # a regular file: O_NONBLOCK changes nothing here
    if blob is None or len(blob) > limit:
        raise SettingFileRefused(0, f"larger than {limit} bytes")
    return blob


def check_setting_file(path: str | Path, *, limit: int) -> None:
    """Refuse ``path`` as ``read_setting_file`` would, for a file another library reads
    (OpenSSL reads the HTTP server's certificate and key by their paths)."""
    read_setting_file(path, limit=limit)


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, for a message: ``st_mode`` in words."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a plain file"
