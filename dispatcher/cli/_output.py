"""Standard output for the commands: its failures are told apart from any other error.

A command's result written to a full disk (``> result.json``) or to a closed standard
output (``>&-``) was a traceback ending in ``OSError``, or, with none at all, nothing and
exit 0: the result lost in silence. Standard output is written through ``Output``, whose
failures are ``OutputError``, which the group's ``main`` reports in one line
(``output_lost``). A reader that went away (``| head``) stays click's: a quiet exit.
"""

from __future__ import annotations

import errno
import io
import os
import sys
from typing import Any, NoReturn, TextIO

import click

__all__ = ["Output", "OutputError", "output_lost"]


class OutputError(OSError):
    """Standard output did not take what a command wrote."""


class Output(io.TextIOWrapper):
    """Standard output, whose failures are ``OutputError``: told apart from any other
    ``OSError`` a command meets, they are the one kind ``main`` reports itself."""

    @classmethod
    def around(cls, stdout: TextIO | None) -> TextIO:
        """``stdout``'s bytes written through this (``stdout`` itself where it has none:
        a host's own stream, a test's)."""
        if stdout is None:  # started without one: each write fails
            return cls(io.BufferedWriter(_Closed()), encoding="utf-8")
        buffer = getattr(stdout, "buffer", None)
        if isinstance(stdout, Output) or not isinstance(buffer, io.BufferedIOBase | io.RawIOBase):
            return stdout
        return cls(
            buffer,  # type: ignore[arg-type]  # raw where PYTHONUNBUFFERED is set
            encoding=stdout.encoding,
            errors=stdout.errors,
            line_buffering=bool(stdout.line_buffering),
            write_through=bool(getattr(stdout, "write_through", False)),
        )

    def write(self, text: str) -> int:
        try:
            return super().write(text)
        except BrokenPipeError:
            raise  # click's: a reader that went away
        except OSError as error:
            raise OutputError(error.errno, error.strerror) from None

    def flush(self) -> None:
        try:
            super().flush()
        except BrokenPipeError:
            raise
        except OSError as error:
            raise OutputError(error.errno, error.strerror) from None


class _Closed(io.RawIOBase):
    """Where a process started without a standard output writes."""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raise OSError(errno.EBADF, "standard output is closed")


def output_lost(error: OSError, status: int) -> NoReturn:
    """Say the output could not be written and exit ``status``; what is left unwritten goes to
    /dev/null, so the interpreter's last flush does not fail again."""
    click.echo(f"error: cannot write the output: {error.strerror or error}", err=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != 1:  # 1 when the process had none: it is its standard output now
        os.dup2(devnull, 1)
        os.close(devnull)
    sys.stdout = Output(open(1, "wb", closefd=False), encoding="utf-8")  # noqa: SIM115
    sys.exit(status)
