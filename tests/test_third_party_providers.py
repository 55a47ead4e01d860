"""Providers from other packages, found through the ``dispatcher.providers`` entry points:
one that works serves calls like a built-in; one whose package is broken is said as such,
never a traceback, and does not stop manifests that do not name it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

ECHO_PROVIDER = """\
from typing import Any, Literal

from providers import Provider, TargetConfig


class EchoTarget(TargetConfig):
    provider: Literal["echo3p"]
    prefix: str = ""


class EchoProvider(Provider[EchoTarget]):
    name = "echo3p"
    target_model = EchoTarget

    async def invoke(self, target: EchoTarget, invocation: Any) -> Any:
        return {"echo": target.prefix + str(invocation.params.get("text"))}


class NotAProvider:
    name = "plain"
"""

#: Entry points as the packages that publish them would install them.
ENTRY_POINTS = {
    "echo3p": "thirdparty_echo:EchoProvider",
    "missing": "thirdparty_gone:Provider",  # its module is not installed
    "plain": "thirdparty_echo:NotAProvider",
    "misnamed": "thirdparty_echo:EchoProvider",  # its class serves "echo3p"
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the third party's module and its installed distribution's metadata."""
    folder = tmp_path_factory.mktemp("site")
    (folder / "thirdparty_echo.py").write_text(ECHO_PROVIDER)
    metadata = folder / "thirdparty_providers-1.0.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: thirdparty-providers\nVersion: 1.0\n"
    )
    lines = "".join(f"{name} = {reference}\n" for name, reference in ENTRY_POINTS.items())
    (metadata / "entry_points.txt").write_text(f"[dispatcher.providers]\n{lines}")
    return folder


def cli(site: Path, tmp_path: Path, target: str, *args: str) -> subprocess.CompletedProcess[str]:
    manifest = tmp_path / "plugins.yaml"
    manifest.write_text(
        "version: 1\nplugins:\n"
        f"  - {{id: p, version: 1.0.0, target: {target}, methods: {{say: {{}}}}}}\n"
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "-m", str(manifest), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=environment,
        timeout=60,
    )


def test_a_provider_from_another_package_validates_and_serves_calls(
    site: Path, tmp_path: Path
) -> None:
    target = "{provider: echo3p, prefix: '3p:'}"
    assert cli(site, tmp_path, target, "validate").returncode == 0
    called = cli(site, tmp_path, target, "call", "p.say", "--params", '{"text": "hi"}')
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout) == {"echo": "3p:hi"}
    # Broken packages beside it are not imported for a manifest that does not name them.
    assert "cannot be loaded" not in called.stderr, called.stderr


@pytest.mark.parametrize(
    ("provider", "reason"),
    [
        ("missing", "ModuleNotFoundError: No module named 'thirdparty_gone'"),
        ("plain", "not a dispatcher Provider subclass"),
        ("misnamed", "its class serves 'echo3p'"),
    ],
)
def test_a_provider_whose_package_is_broken_is_a_manifest_problem_not_a_traceback(
    site: Path, tmp_path: Path, provider: str, reason: str
) -> None:
    # It was a traceback of the import, and so was any manifest naming an unknown
    # provider, or with any problem at all, while a broken one was installed.
    run = cli(site, tmp_path, f"{{provider: {provider}}}", "validate")
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert f"plugins[0].target.provider: provider {provider!r}" in run.stderr, run.stderr
    assert reason in run.stderr, run.stderr


def test_with_a_broken_package_installed_other_manifests_load_and_say_their_problems(
    site: Path, tmp_path: Path
) -> None:
    fine = cli(site, tmp_path, "{provider: http, url: 'http://127.0.0.1:9/'}", "validate")
    assert fine.returncode == 0, fine.stderr
    assert fine.stderr == "", fine.stderr  # nothing but what it needs is imported
    misspelt = cli(site, tmp_path, "{provider: htp, url: 'http://127.0.0.1:9/'}", "validate")
    assert misspelt.returncode == 2, misspelt.stderr
    assert "Traceback" not in misspelt.stderr, misspelt.stderr
    # The providers a target may name: every loadable one, the third party's included.
    listed = misspelt.stderr.split("expected tags:")[1]
    assert "'echo3p'" in listed and "'http'" in listed, misspelt.stderr
    assert not any(f"'{name}'" in listed for name in ("missing", "plain", "misnamed"))
    # Each broken one said once, as a warning.
    for name in ("missing", "plain", "misnamed"):
        assert misspelt.stderr.count(f"provider {name!r}") == 1, misspelt.stderr
    invalid = cli(site, tmp_path, "{provider: http, url: 'ftp://127.0.0.1/'}", "validate")
    assert invalid.returncode == 2 and "Traceback" not in invalid.stderr, invalid.stderr
    assert "plugins[0].target.url" in invalid.stderr, invalid.stderr
