"""Each compiled SDK's README quick start, copy-pasted into an empty folder outside the
repository, builds a plugin the dispatcher then calls.

The steps are the README's fenced blocks that follow a marker, in the README's order (the
markers of tests/test_quick_start.py):

* ``<!-- quick-start write: FILE -->``: the block is FILE's content;
* ``<!-- quick-start run -->``: each line of the block runs in the folder, in a shell whose
  ``PATH`` starts with this interpreter's, and must exit 0; the last line's output is the
  call's answer.

The only substitution is the checkout: ``/path/to/dispatcher`` becomes this repository.
Each README's "Use it from a checkout" section must show the same dependency lines, so the
two cannot drift apart. Builds are offline (Go's proxy off, cargo offline) and reuse what
``make sdks`` compiled (tests/sdk_toolchains.py); npm needs the registry's package
metadata once, since a quick start has no lock file (``dispatcher new`` writes one).
"""

from __future__ import annotations

import json
import re
import shlex
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.sdk_toolchains import (
    CARGO,
    GO,
    GO_AS_MAKE_SDKS,
    MVN,
    NPM,
    OFFLINE,
    RUST_TARGET,
    install_java_sdk,
    require,
    run,
)

pytestmark = pytest.mark.toolchain

CHECKOUT = "/path/to/dispatcher"
_MARKER = re.compile(
    r"<!-- quick-start (?P<kind>write|run)(?:: (?P<file>\S+))? -->\n```[^\n]*\n(?P<body>.*?)^```",
    re.MULTILINE | re.DOTALL,
)


@dataclass(frozen=True)
class Step:
    kind: str  # "write" or "run"
    file: str | None
    body: str


def quick_start(readme: Path) -> list[Step]:
    text = readme.read_text(encoding="utf-8").replace(CHECKOUT, str(ROOT))
    return [Step(m["kind"], m["file"], m["body"]) for m in _MARKER.finditer(text)]


@pytest.fixture
def empty_folder() -> Iterator[Path]:
    """A folder outside the repository, as a reader's would be."""
    with tempfile.TemporaryDirectory(prefix="quick-start-") as folder:
        path = Path(folder).resolve()
        assert not path.is_relative_to(ROOT)
        yield path


def walk(readme: Path, folder: Path, **environment: str) -> str:
    """Write and run the quick start's steps in ``folder``; the last command's stdout."""
    steps = quick_start(readme)
    assert [s.kind for s in steps].count("run") >= 1, f"{readme} has no marked quick start"
    output = ""
    for step in steps:
        if step.kind == "write":
            assert step.file is not None
            target = folder / step.file
            assert target.resolve().is_relative_to(folder), step.file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(step.body, encoding="utf-8")
            continue
        for line in step.body.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            done = run(["bash", "-c", line], folder, **environment)
            assert done.returncode == 0, f"{readme}: `{line}` failed:\n{done.stdout}\n{done.stderr}"
            output = done.stdout
    return output


def checkout_lines(readme: Path) -> str:
    """The README's "Use it from a checkout" section, the checkout substituted."""
    text = readme.read_text(encoding="utf-8").replace(CHECKOUT, str(ROOT))
    section = re.search(
        r"^## Use it from a checkout\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL
    )
    assert section, f"{readme} has no 'Use it from a checkout' section"
    return section.group(1)


def assert_answers_ada(output: str) -> None:
    assert json.loads(output) == {"message": "hello, Ada"}


def test_the_go_quick_start_builds_offline_and_answers_a_call(empty_folder: Path) -> None:
    require(GO)
    readme = ROOT / "sdk" / "go" / "README.md"
    replace = f"replace github.com/linchkit/dispatcher/sdk/go => {ROOT}/sdk/go"
    assert replace in checkout_lines(readme)
    assert replace in (ROOT / "dispatcher/cli/templates/go/go.mod.tmpl").read_text().replace(
        "{{sdk}}", f"{ROOT}/sdk/go"
    )
    assert_answers_ada(walk(readme, empty_folder, **OFFLINE, **GO_AS_MAKE_SDKS))


def test_the_rust_quick_start_builds_offline_and_answers_a_call(empty_folder: Path) -> None:
    require(CARGO)
    readme = ROOT / "sdk" / "rust" / "README.md"
    assert f'linchkit-plugin = {{ path = "{ROOT}/sdk/rust" }}' in checkout_lines(readme)
    # The reader's target/ is make sdks' one: only the SDK and the plugin compile here.
    RUST_TARGET.mkdir(exist_ok=True)
    (empty_folder / "target").symlink_to(RUST_TARGET, target_is_directory=True)
    assert_answers_ada(walk(readme, empty_folder, **OFFLINE))


def test_the_java_quick_start_builds_and_answers_a_call(empty_folder: Path) -> None:
    require(MVN)
    install_java_sdk()  # ~/.m2 then holds every plugin Maven needs: its own step is quick
    readme = ROOT / "sdk" / "java" / "README.md"
    lines = checkout_lines(readme)
    assert f"cd {ROOT}/sdk/java && mvn -q install -DskipTests" in lines
    assert "<artifactId>linchkit-plugin-sdk</artifactId>" in lines
    assert_answers_ada(walk(readme, empty_folder))


def test_the_typescript_quick_start_builds_and_answers_a_call(empty_folder: Path) -> None:
    require(NPM)
    readme = ROOT / "sdk" / "typescript" / "README.md"
    dependency = f'"@linchkit/plugin-sdk": "file:{ROOT}/sdk/typescript"'
    assert dependency in checkout_lines(readme)
    assert_answers_ada(walk(readme, empty_folder))


def test_the_python_readme_installs_from_a_checkout() -> None:
    lines = checkout_lines(ROOT / "sdk" / "python" / "README.md")
    assert f"pip install '{ROOT}/sdk/python[http]'" in lines
    for command in re.findall(r"^pip install .*$", lines, re.MULTILINE):
        for argument in shlex.split(command)[2:]:
            if argument.startswith("/"):
                assert Path(argument.split("[")[0]).is_dir(), command
