"""The README's quick start, walked from an empty folder exactly as written.

The steps are the README's code blocks that follow a marker, in the README's order:

* ``<!-- quick-start write: FILE -->``: the block is FILE's content;
* ``<!-- quick-start append: FILE -->``: the block is appended to FILE;
* ``<!-- quick-start serve -->``: the block's command is left running, like the author's
  first terminal (``dispatcher-plugin serve``), until it says where it listens;
* ``<!-- quick-start run -->``: each line of the block runs in the folder, in a shell
  whose ``PATH`` starts with this interpreter's, and must exit 0.

An ``export`` line of a ``run`` block holds for the block's later lines, as in a shell.

Edit a marked block and this test runs the new text; drop or reorder a step and it
fails. Three substitutions keep parallel runs apart: the ports 8081 (the plugin) and 3001
(the local Lambda) become free ports, the image ``echo-plugin:1.0.0`` a tag of this run's
own (removed afterwards).
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import ROOT

README = ROOT / "README.md"
BIN = Path(sys.executable).parent
_STEP = re.compile(
    r"<!-- quick-start (?P<kind>write|append|serve|run)(?::\s*(?P<file>\S+))?\s*-->\s*\n"
    r"```\w*\n(?P<text>.*?)^```",
    re.MULTILINE | re.DOTALL,
)
README_PORT = "8081"
README_LAMBDA_PORT = "3001"
README_IMAGE = "echo-plugin:1.0.0"


@dataclass(frozen=True, slots=True)
class Step:
    kind: str
    file: str | None
    text: str


def quick_start_steps(port: int, lambda_port: int, image: str) -> list[Step]:
    section = README.read_text(encoding="utf-8")
    steps = []
    for match in _STEP.finditer(section):
        text = (
            match["text"]
            .replace(README_PORT, str(port))
            .replace(README_LAMBDA_PORT, str(lambda_port))
            .replace(README_IMAGE, image)
        )
        steps.append(Step(match["kind"], match["file"], text))
    return steps


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def shell_environment() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture
def docker_base_image() -> None:
    """The engine, the base image `dispatcher deploy` builds on and the Lambda runtime image
    (idempotent scripts)."""
    subprocess.run([str(ROOT / "scripts" / "start-docker.sh")], check=True)
    subprocess.run(
        [str(ROOT / "infra" / "docker" / "build-base-image.sh")],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        ["bash", str(ROOT / "infra" / "lambda" / "build-runtime-image.sh"), sys.executable],
        check=True,
        stdout=subprocess.DEVNULL,
    )


class Served:
    """The command of a ``serve`` step, running; its output lines arrive on a queue."""

    def __init__(self, command: str, folder: Path) -> None:
        self.process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=folder,
            env=shell_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.process.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,))
        self._reader.start()

    def _read(self, stderr: IO[str]) -> None:
        for line in stderr:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"the served plugin never printed {text!r}")
            if text in line:
                return line

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self._reader.join(timeout=10)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def walk_folder(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    image = f"linchkit-quickstart/echo-{uuid.uuid4().hex[:12]}:1.0.0"
    yield tmp_path / "echo", image
    subprocess.run(["docker", "image", "rm", "-f", image], capture_output=True, check=False)


def test_the_readme_quick_start_runs_as_written(
    docker_base_image: None, walk_folder: tuple[Path, str]
) -> None:
    folder, image = walk_folder
    folder.mkdir()
    port, lambda_port = free_port(), free_port()
    steps = quick_start_steps(port, lambda_port, image)
    assert [(step.kind, step.file) for step in steps] == [
        ("write", "echo_plugin.py"),
        ("serve", None),
        ("write", "plugins.yaml"),
        ("run", None),
        ("write", "call.py"),
        ("run", None),
        ("append", "plugins.yaml"),
        ("run", None),
        ("append", "plugins.yaml"),
        ("serve", None),
        ("run", None),
    ], "the quick start's marked steps changed: update this walk with them"
    outputs: dict[str, str] = {}
    served: list[Served] = []
    try:
        for step in steps:
            if step.kind == "write":
                (folder / str(step.file)).write_text(step.text, encoding="utf-8")
            elif step.kind == "append":
                with (folder / str(step.file)).open("a", encoding="utf-8") as file:
                    file.write(step.text)
            elif step.kind == "serve":
                server = Served(step.text.strip(), folder)
                served.append(server)
                line = server.wait_for("listening on", timeout=120)
                if "local-lambda" in step.text:
                    assert f"http://127.0.0.1:{lambda_port}" in line
                else:
                    assert "serving echo_plugin:EchoPlugin" in line
                    assert f"http://127.0.0.1:{port}" in line
            else:
                exports: list[str] = []
                for command in filter(None, map(str.strip, step.text.splitlines())):
                    if command.startswith("export "):
                        exports.append(command)
                        continue
                    done = subprocess.run(
                        ["bash", "-c", "; ".join([*exports, command])],
                        cwd=folder,
                        env=shell_environment(),
                        capture_output=True,
                        text=True,
                        timeout=300,
                        check=False,
                    )
                    assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
                    outputs[command] = done.stdout
    finally:
        for server in served:
            server.stop()

    assert "plugins.yaml: ok (1 plugins, 2 methods)" in outputs["dispatcher validate"]
    assert "echo@1.0.0" in outputs["dispatcher list"]
    answer = {"text": "hi", "greeting": "hi", "caller": None}
    assert json.loads(outputs["""dispatcher call echo.say -p '{"text": "hi"}'"""]) == answer
    assert "InsufficientFunds cannot withdraw 500" in outputs["python call.py"]
    assert "'caller': 'alice'" in outputs["python call.py"]
    assert re.search(r"deployed|up to date", outputs["dispatcher deploy echo-box"])
    from_the_box = json.loads(outputs["""dispatcher call echo-box.say -p '{"text": "hi"}'"""])
    assert from_the_box == {"text": "hi", "greeting": "from a container", "caller": None}
    assert re.search(r"deployed|up to date", outputs["dispatcher deploy echo-lambda"])
    from_lambda = json.loads(outputs["""dispatcher call echo-lambda.say -p '{"text": "hi"}'"""])
    assert from_lambda == {"text": "hi", "greeting": "from Lambda", "caller": None}
