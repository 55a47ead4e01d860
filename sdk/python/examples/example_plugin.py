"""The example plugin every SDK implements (docs/protocol.md, "The example plugin"), in Python.

Built by ``sdk/python/build.sh`` into ``sdk/python/dist/example-plugin``; runs as a
subprocess plugin (handshake), as a gRPC service (``example-plugin serve --address …``), as a
WebSocket server (``serve --websocket``) or dialling a gateway (``connect --url …``).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import sys
from collections.abc import AsyncIterator
from typing import Any

from linchkit_plugin import Plugin
from linchkit_plugin.errors import InvalidParams, PluginError
from linchkit_plugin.grpc_server import main
from linchkit_plugin.plugin import raw_params

#: The most letters x ``pad`` asks for (64 MiB): the suite's largest chunk is 9 MB, and a
#: caller's 2**40 must be refused before it is allocated, not kill the plugin.
MAX_PAD = 64 << 20
#: The most chunks ``count`` sends: a unary call collects them all before it answers.
MAX_COUNT = 1_000_000
#: What ``non_finite`` returns for each of its values.
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class ExampleFailure(Exception):
    """The business error of ``fail``: the host sees PluginError(remote_type='ExampleFailure')."""


def _integer(name: str, value: Any) -> int:
    if type(value) is not int:
        raise InvalidParams(f"{name!r} must be an integer, got {value!r:.40}")
    return value


def _at_most(name: str, value: Any, bound: int, shown: str = "") -> int:
    """``value`` as a non-negative integer no larger than ``bound`` (``shown``: the bound in
    other words too), else InvalidParams naming both."""
    number = _integer(name, value)
    if number < 0:
        raise InvalidParams(f"{name!r} must be a non-negative integer, got {number}")
    if number > bound:
        raise InvalidParams(f"{name!r} must be at most {bound}{shown}, got {number}")
    return number


def _padding(pad: Any) -> str:
    """``pad`` letters x, at most 64 MiB: how the suite makes a chunk or an event as large
    as it needs."""
    return "x" * _at_most("pad", pad, MAX_PAD, " (64 MiB)")


class ExamplePlugin(Plugin):
    methods = (
        "echo",
        "digest",
        "fail",
        "sleep",
        "count",
        "emit",
        "config",
        "hooks",
        "non_finite",
        "not_unicode",
    )

    def __init__(self) -> None:
        self._hooks = {"init": 0, "start": 0, "stop": 0, "destroy": 0}

    async def init(self, config: dict[str, Any]) -> None:
        self._hooks["init"] += 1
        self._config = config
        self._fail_if_named("init")

    async def start(self) -> None:
        self._hooks["start"] += 1
        self._fail_if_named("start")

    def _fail_if_named(self, hook: str) -> None:
        """A config's ``fail_hook`` fails that hook: how the suite sees what the SDK answers."""
        if getattr(self, "_config", {}).get("fail_hook") == hook:
            raise PluginError(f"fail_hook names {hook}", remote_type="BadConfig")

    async def stop(self) -> None:
        self._hooks["stop"] += 1
        self._say("stop")
        await self._stall_if_named("stop")

    async def destroy(self) -> None:
        self._hooks["destroy"] += 1
        self._say("destroy")
        await self._stall_if_named("destroy")

    async def _stall_if_named(self, hook: str) -> None:
        """A config's ``stall_hook`` has that hook never return (a close stuck on a peer
        that does not answer): how the suite sees that a stop does not wait for it."""
        if getattr(self, "_config", {}).get("stall_hook") == hook:
            await asyncio.Event().wait()

    def _say(self, hook: str) -> None:
        """A config's ``say_hooks`` has the stop and destroy hooks each write a line to
        stderr: how the suite sees that they ran once the process is gone."""
        if getattr(self, "_config", {}).get("say_hooks") is True:
            sys.stderr.write(f"example: {hook} hook ran\n")
            sys.stderr.flush()

    @raw_params
    async def echo(self, params: Any) -> Any:
        """The params, unchanged."""
        return params

    def digest(self, data: str, rounds: int) -> str:
        """Hex SHA-256 applied ``rounds`` times; CPU-bound, so it runs in a worker thread."""
        if not isinstance(data, str):
            raise InvalidParams(f"'data' must be a string, got {data!r:.40}")
        value = data.encode()
        for _ in range(_integer("rounds", rounds)):
            value = hashlib.sha256(value).digest()
        return value.hex()

    async def fail(self, message: str) -> None:
        """Always fails with the business error ExampleFailure."""
        raise ExampleFailure(message)

    async def sleep(self, ms: int) -> dict[str, int]:
        """Sleeps ``ms`` milliseconds (the host's deadline cuts it short)."""
        await asyncio.sleep(_integer("ms", ms) / 1000)
        return {"slept_ms": ms}

    async def count(self, n: int, pad: int = 0) -> AsyncIterator[dict[str, Any]]:
        """Streams {"i": 0} … {"i": n-1}, ``n`` at most 1,000,000; with ``pad`` > 0 (at
        most 64 MiB) each chunk also carries ``"pad"``, a string of that many letters x."""
        count = _at_most("n", n, MAX_COUNT)
        padding = _padding(pad)
        for i in range(count):
            yield {"i": i, "pad": padding} if padding else {"i": i}

    async def emit(self, name: str, data: Any = None, pad: int = 0) -> bool:  # type: ignore[override]
        """Emits the plugin event ``name`` with ``data``; with ``pad`` > 0 (at most 64 MiB)
        the data is a string of that many letters x instead."""
        if not isinstance(name, str):
            raise InvalidParams("'name' must be a string")
        padding = _padding(pad)
        Plugin.emit(self, name, padding if padding else data)
        return True

    async def config(self) -> Any:
        """The JSON object passed to Init."""
        return getattr(self, "_config", {})

    async def hooks(self, after_ms: int = 0) -> dict[str, int]:
        """How many times each lifecycle hook ran, counted ``after_ms`` milliseconds from now:
        whether a stop ran them under a call still in flight."""
        await asyncio.sleep(_integer("after_ms", after_ms) / 1000)
        return dict(self._hooks)

    async def non_finite(self, value: Any = None) -> dict[str, float]:
        """``{"x": NaN}``, ``+inf`` or ``-inf`` as ``value`` says: a result JSON cannot carry,
        which the SDK answers as this call's provider_error."""
        if not isinstance(value, str) or value not in NON_FINITE:
            raise InvalidParams(f'\'value\' must be "nan", "inf" or "-inf", got {value!r:.40}')
        return {"x": NON_FINITE[value]}

    async def not_unicode(self, **_ignored: Any) -> dict[str, str]:
        """``{"text": "caf\\udce9"}``: Latin-1 bytes read as UTF-8 with ``surrogateescape``,
        a string with no UTF-8 form, which the SDK answers as this call's provider_error."""
        return {"text": b"caf\xe9".decode("utf-8", errors="surrogateescape")}

    async def on_event(self, event: str, data: Any) -> None:
        if event == "ping":
            Plugin.emit(self, "pong", data)
        elif event == "fail":  # a handler that fails: the SDK logs it and goes on
            raise RuntimeError(data.get("message") if isinstance(data, dict) else data)


if __name__ == "__main__":
    if sys.argv[1:2] == ["connect"] or "--websocket" in sys.argv[1:]:
        from linchkit_plugin.ws_server import main as websocket_main

        sys.exit(websocket_main(ExamplePlugin, sys.argv[1:], plugin_id="example", version="1.0.0"))
    sys.exit(main(ExamplePlugin, plugin_id="example", version="1.0.0", runtime="python"))
