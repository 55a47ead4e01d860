"""A plugin whose slow method records, as files, when it started, was cancelled or ended."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from linchkit_plugin import Plugin


def _mark(name: str) -> None:
    (Path(os.environ["CANCEL_MARKS_DIR"]) / name).touch()


class CancelMarksPlugin(Plugin):
    async def slow(self, seconds: float, tag: str) -> str:
        _mark(f"start-{tag}")
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            _mark(f"cancelled-{tag}")
            raise
        _mark(f"done-{tag}")
        return tag
