"""Plugin processes start although grpc's threads are busy as the dispatcher forks them
(``providers._fork_safety``).

grpc core's fork handlers, on by default, ran in the forked child before it reached
``exec`` while other threads were in grpc calls, and the child died of SIGABRT
("Check failed: next_worker->state == KICKED") or SIGSEGV before its handshake:
``dispatcher serve`` with twelve subprocess plugins failed to start in 4 runs of 5.
Each run here is a fresh interpreter, as only one that has not imported grpc yet shows it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT

PLUGINS = ROOT / "tests" / "plugins"
SOURCE_PATH = os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python")])
#: Enough plugins that later ones are forked while the earlier ones' gRPC calls run.
PLUGIN_COUNT = 12
RUNS = 3


def _manifest(folder: Path) -> Path:
    entries = [
        {
            "id": f"counted-{index}",
            "version": "1.0.0",
            "target": {
                "provider": "subprocess",
                "command": [sys.executable, str(PLUGINS / "crashing_plugin.py")],
                "env": {"PYTHONPATH": SOURCE_PATH},
            },
            "methods": {"pid": {}},
        }
        for index in range(PLUGIN_COUNT)
    ]
    path = folder / "plugins.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "plugins": entries}))
    return path


async def _serve_once(manifest: Path, environment: dict[str, str]) -> tuple[int, str]:
    """Start ``dispatcher serve`` (its gRPC port too), stop it once it listens; its exit
    code and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher.cli", "-m", str(manifest), "serve",
        "--port", "0", "--grpc-port", "0", "--grace", "5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    try:
        # Listening means every plugin started; an empty line, that serve exited.
        first = await asyncio.wait_for(process.stdout.readline(), 120)
        if first.startswith(b"listening on "):
            process.send_signal(signal.SIGTERM)
        stderr = await asyncio.wait_for(process.stderr.read(), 60)
        return await asyncio.wait_for(process.wait(), 60), stderr.decode(errors="replace")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_many_subprocess_plugins_start_with_grpc_busy_in_the_dispatcher(
    tmp_path: Path,
) -> None:
    manifest = _manifest(tmp_path)
    environment = {**os.environ, "PYTHONPATH": SOURCE_PATH}
    environment.pop("GRPC_ENABLE_FORK_SUPPORT", None)  # the default a user has
    for _ in range(RUNS):
        code, stderr = await _serve_once(manifest, environment)
        assert "before its handshake" not in stderr, stderr[-2000:]
        assert "skipping fork() handlers" not in stderr
        assert code == 0, stderr[-2000:]


async def test_a_host_that_imported_grpc_first_is_told_how_to_mend_it(tmp_path: Path) -> None:
    script = (
        "import logging, grpc\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "import providers._fork_safety as safety\n"
        "log = logging.getLogger('dispatcher.providers')\n"
        "safety.note_late_grpc(log)\n"
        "safety.note_late_grpc(log)\n"
    )
    environment = {**os.environ, "PYTHONPATH": SOURCE_PATH}
    environment.pop("GRPC_ENABLE_FORK_SUPPORT", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, env=environment, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    said = stderr.decode()
    assert said.count("WARNING grpc was imported before the dispatcher") == 1, said
    assert "GRPC_ENABLE_FORK_SUPPORT=false" in said
    # Set in the environment, it is the user's choice: nothing to say.
    environment["GRPC_ENABLE_FORK_SUPPORT"] = "false"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, env=environment, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert b"grpc was imported" not in stderr
