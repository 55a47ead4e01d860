"""``dispatcher serve`` as a real process: it says where it listens, serves calls, and on
SIGTERM drains (the call in flight finishes, new ones get 503) and exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import orjson
import yaml

from tests.conftest import ROOT
from tests.gateway_support import echo_entry


async def start_serve(tmp_path: Path, *options: str) -> asyncio.subprocess.Process:
    manifest = tmp_path / "plugins.yaml"
    manifest.write_text(yaml.safe_dump({"version": 1, "plugins": [echo_entry(sleep={}, say={})]}))
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'sdk' / 'python'}"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher.cli", "-m", str(manifest), "serve", "--port", "0", *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )  # fmt: skip


async def test_serve_calls_then_drains_on_sigterm(tmp_path: Path) -> None:
    process = await start_serve(tmp_path, "--grace", "10")
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{url}/v1/plugins/echo/methods/say", json={"text": "hi"}
            ) as answer:
                assert answer.status == 200
                assert (await answer.json())["result"]["text"] == "hi"
            slow = asyncio.create_task(
                session.post(f"{url}/v1/plugins/echo/methods/sleep", json={"seconds": 1.0})
            )
            await asyncio.sleep(0.3)  # the call is in flight (it takes a second)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with session.post(
                f"{url}/v1/plugins/echo/methods/say", json={"text": "late"}
            ) as late:
                assert late.status == 503
                assert (await late.json())["error"]["type"] == "shutting_down"
            answer = await slow
            assert answer.status == 200
            assert orjson.loads(await answer.read())["result"] >= 0.9  # it ran to its end
            answer.release()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_serve_refuses_client_certificates_without_tls_as_bad_usage(tmp_path: Path) -> None:
    process = await start_serve(tmp_path, "--client-cert", "required")
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert b"client certificates need TLS" in stderr


async def test_serve_refuses_an_empty_host_rather_than_every_interface(tmp_path: Path) -> None:
    """``--host ""`` (an unset variable in a script) listened on 0.0.0.0."""
    process = await start_serve(tmp_path, "--host", "")
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert b"host is empty" in stderr and b"Traceback" not in stderr
