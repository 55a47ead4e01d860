"""The example plugin in another language, called both ways through the dispatcher.

Picks the first built example plugin among Go, Rust, Java, TypeScript (then Python):
runs it as a gRPC service (`example-plugin serve`) and as a subprocess plugin (handshake,
Unix socket, AutoMTLS), and makes the same calls through both, errors included.

    python examples/polyglot_demo.py [go|rust|java|typescript|python]
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from dispatcher import Dispatcher, DispatchError, parse_manifest

ROOT = Path(__file__).resolve().parent.parent
PREFERENCE = ("go", "rust", "java", "typescript", "python")
METHODS = ("echo", "digest", "fail", "sleep", "count", "emit", "config")


def pick(wanted: str | None) -> tuple[str, Path]:
    for language in (wanted,) if wanted else PREFERENCE:
        path = ROOT / "sdk" / str(language) / "dist" / "example-plugin"
        if os.access(path, os.X_OK):
            return str(language), path
    raise SystemExit("no example plugin is built: run `make test` (it runs every sdk/*/build.sh)")


def show(label: str, value: Any, started: float) -> None:
    print(f"  {label:<48} → {value}  [{(time.perf_counter() - started) * 1000:.1f} ms]")


async def exercise(dispatcher: Dispatcher, plugin: str) -> None:
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    dispatcher.on(plugin, "*", lambda event, data: events.put_nowait((event, data)))
    calls: list[tuple[str, Any, dict[str, Any]]] = [
        ("echo", {"text": "hi", "big": 2**60}, {}),
        ("digest", {"data": "abc", "rounds": 100_000}, {}),
        ("fail", {"message": "card declined"}, {}),
        ("sleep", {"ms": 2_000}, {"timeout": 0.2}),
        ("count", {"n": 3}, {}),
        ("config", {}, {}),
        ("digest", {"data": "abc", "rounds": "many"}, {}),
    ]
    for method, params, options in calls:
        started = time.perf_counter()
        try:
            result: Any = await dispatcher.call(plugin, method, params, **options)
        except DispatchError as error:
            result = f"{type(error).__name__}: {error}"
        show(f"{method}({params})", result, started)
    started = time.perf_counter()
    chunks = [chunk async for chunk in dispatcher.stream(plugin, "count", {"n": 4})]
    show("stream count({'n': 4})", chunks, started)
    started = time.perf_counter()
    await dispatcher.publish(plugin, "ping", {"from": "host"})
    await dispatcher.call(plugin, "emit", {"name": "order.paid", "data": {"id": 7}})
    received = [await asyncio.wait_for(events.get(), 5) for _ in range(2)]
    show("publish ping + emit order.paid → events", received, started)
    (report,) = await dispatcher.health()
    print(f"  health: {report.target} {report.health.status}")


def manifest(plugin: str, target: dict[str, Any]) -> Any:
    return parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": plugin,
                    "version": "1.0.0",
                    "config": {"greeting": f"configured for {plugin}"},
                    "target": target,
                    "lifecycle": {"init_timeout_ms": 60_000},
                    "defaults": {"timeout_ms": 10_000},
                    "methods": {name: {} for name in METHODS},
                }
            ],
        },
        base_dir=ROOT,
    )


async def main(wanted: str | None) -> None:
    language, path = pick(wanted)
    print(f"\nthe {language} example plugin as a gRPC service:")
    token = secrets.token_urlsafe(24)  # the service checks it on every plugin RPC
    service = await asyncio.create_subprocess_exec(
        str(path),
        "serve",
        "--address",
        "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "LINCHKIT_PLUGIN_TOKEN": token},
    )
    assert service.stdout is not None
    try:
        line = (await asyncio.wait_for(service.stdout.readline(), 60)).decode().strip()
        address = line.split("|")[3]
        target = {
            "provider": "grpc",
            "address": address,
            "lifecycle": "dispatcher",
            "metadata": {"authorization": f"Bearer {token}"},
        }
        async with Dispatcher(manifest(f"{language}-service", target)) as dispatcher:
            await exercise(dispatcher, f"{language}-service")
    finally:
        service.terminate()
        await service.wait()

    print(f"\nthe {language} example plugin as a subprocess plugin (Unix socket, AutoMTLS):")
    target = {"provider": "subprocess", "command": [str(path)]}
    async with Dispatcher(manifest(f"{language}-subprocess", target)) as dispatcher:
        provider: Any = dispatcher.providers["subprocess"]
        (process,) = provider._processes.values()
        pid = process.pid
        print(f"  launched pid {pid}")
        await exercise(dispatcher, f"{language}-subprocess")
    gone = not os.path.exists(f"/proc/{pid}")  # noqa: ASYNC240 - one stat, after the work
    print(f"  {process.state}: pid {pid} is gone: {gone}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
