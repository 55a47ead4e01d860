"""The main job, end to end on the embedded defaults (`make demo`): offline, no account.

Starts the example plugin as an HTTP function in a child process, loads `plugins.yaml`
(the same plugin in-process and over HTTP), calls both through the dispatcher and
prints what happened, errors included.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from dispatcher import Dispatcher, DispatchError

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def http_function(port: int) -> Iterator[None]:
    """Run `dispatcher-plugin serve` for the example plugin until the block ends."""
    command = [
        str(Path(sys.executable).with_name("dispatcher-plugin")),
        "serve",
        "echo_plugin:EchoPlugin",
        "--path",
        str(ROOT / "examples" / "python"),
        "--port",
        str(port),
        "--config",
        '{"greeting": "hello from an HTTP function"}',
    ]
    # The plugin server checks the token the manifest's bearer_token sends (README: errors).
    server = subprocess.Popen(
        command, env={**os.environ, "LINCHKIT_PLUGIN_TOKEN": os.environ["ECHO_HTTP_TOKEN"]}
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the HTTP function did not start")
            time.sleep(0.05)
        yield
    finally:
        server.terminate()
        server.wait(timeout=10)


def show(label: str, value: Any) -> None:
    print(f"  {label:<44} → {value}")


async def attempt(
    dispatcher: Dispatcher, plugin: str, method: str, params: Any, **options: Any
) -> None:
    label = f"{plugin}.{method}({params})"
    started = time.perf_counter()
    try:
        result = await dispatcher.call(plugin, method, params, **options)
    except DispatchError as error:
        result = f"{type(error).__name__}: {error}"
    show(label, f"{result}  [{(time.perf_counter() - started) * 1000:.1f} ms]")


async def main() -> None:
    async with Dispatcher.from_file(ROOT / "plugins.yaml") as dispatcher:
        for plugin in ("echo", "echo-http"):
            print(f"\n{plugin}:")
            await attempt(dispatcher, plugin, "say", {"text": "hi"}, caller="demo")
            await attempt(dispatcher, plugin, "digest", {"data": "abc", "rounds": 20000})
            await attempt(dispatcher, plugin, "withdraw", {"amount": 500})
            await attempt(dispatcher, plugin, "sleep", {"seconds": 5}, timeout=0.2)
            await attempt(dispatcher, plugin, "nope", {})
        await attempt(dispatcher, "echo", "say", {"text": 42})
        await attempt(dispatcher, "missing", "say", {})

        print("\ncall_many across both targets:")
        results = await dispatcher.call_many(
            [
                ("echo", "say", {"text": str(i)})
                if i % 2
                else ("echo-http", "say", {"text": str(i)})
                for i in range(6)
            ]
        )
        show("6 calls", [result["text"] for result in results])

        print("\nhealth:")
        for report in await dispatcher.health():
            show(f"{report.plugin}@{report.version} {report.target}", report.health.status)


def docker_engine_and_base_image() -> bool:
    """Is a Docker engine up? If so, make sure the offline base image is built (idempotent)."""
    if (
        not shutil.which("docker")
        or subprocess.run(["docker", "info"], capture_output=True).returncode
    ):
        return False
    subprocess.run(
        [str(ROOT / "infra" / "docker" / "build-base-image.sh")],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        stdout=subprocess.DEVNULL,
    )
    return True


async def docker_demo() -> None:
    """The same plugin as a sandboxed container (docs/docker.md)."""
    from dispatcher.config import load_manifest
    from providers.docker import DockerProvider

    print("\necho-box (docker):")
    manifest = load_manifest(ROOT / "examples" / "docker-plugins.yaml")
    plugin = manifest.plugins[0]
    async with DockerProvider() as provider:
        deployer = provider.deployer()
        assert deployer is not None
        plan = await deployer.apply(plugin, plugin.target)
    show("dispatcher deploy echo-box", plan.render())
    async with Dispatcher(manifest) as dispatcher:
        await attempt(dispatcher, "echo-box", "say", {"text": "cold start"}, caller="demo")
        await attempt(dispatcher, "echo-box", "say", {"text": "warm"}, caller="demo")
        await attempt(dispatcher, "echo-box", "digest", {"data": "abc", "rounds": 20000})
        await attempt(dispatcher, "echo-box", "withdraw", {"amount": 500})
        await attempt(dispatcher, "echo-box", "sleep", {"seconds": 5}, timeout=0.2)
        for report in await dispatcher.health():
            show("health", f"{report.target}: {report.health.status} ({report.health.detail})")
    show("after exit", "every container of this dispatcher is removed")


if __name__ == "__main__":
    port = free_port()
    os.environ["ECHO_HTTP_PORT"] = str(port)
    os.environ["ECHO_HTTP_TOKEN"] = secrets.token_urlsafe(24)
    with http_function(port):
        asyncio.run(main())
    if docker_engine_and_base_image():
        asyncio.run(docker_demo())
    else:
        print("\necho-box (docker): skipped, no Docker engine (scripts/start-docker.sh starts one)")
