"""The former home of ``linchkit_plugin.argument_parser``, kept for code that imports it
from here: the same names, nothing of its own."""

from __future__ import annotations

from linchkit_plugin.argument_parser import (
    RedactingArgumentParser,
    option_name,
    refused_arguments,
)

__all__ = ["RedactingArgumentParser", "option_name", "refused_arguments"]
