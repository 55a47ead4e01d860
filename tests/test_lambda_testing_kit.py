"""``dispatcher.testing``, used the way a plugin author would: override the manifest, ask
for ``lambda_dispatcher``, call the plugin deployed to the local Lambda; and the same in a
fresh project with no pytest configuration (pytest-asyncio's strict mode)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from dispatcher import Dispatcher
from tests.conftest import ROOT
from tests.lambda_support import echo_lambda_manifest


@pytest.fixture
def lambda_manifest(tmp_path: Path) -> Path:
    manifest = tmp_path / "plugins.yaml"
    manifest.write_text(yaml.safe_dump(echo_lambda_manifest("kit-echo", greeting="from the kit")))
    return manifest


async def test_the_fixture_yields_a_dispatcher_with_the_plugin_deployed(
    lambda_dispatcher: Dispatcher,
) -> None:
    answer = await lambda_dispatcher.call("echo-lambda", "say", {"text": "hi"}, caller="author")
    assert answer == {"text": "hi", "greeting": "from the kit", "caller": "author"}
    [report] = await lambda_dispatcher.health()
    assert report.health.status == "serving"
    assert report.target == "lambda kit-echo:live (us-east-1)"


# A plugin author's first test file: no marks, no pytest configuration anywhere.
FRESH_TESTS = """
import pytest


async def test_unmarked(lambda_dispatcher):
    answer = await lambda_dispatcher.call("echo-lambda", "say", {"text": "hi"})
    assert answer["greeting"] == "fresh"


@pytest.mark.asyncio
async def test_marked_the_strict_way(lambda_dispatcher):
    assert (await lambda_dispatcher.call("echo-lambda", "say", {"text": "x"}))["text"] == "x"


class TestInAClass:
    async def test_method(self, local_lambda):
        assert local_lambda.url.startswith("http://127.0.0.1:")


def test_a_plain_test_is_left_alone(lambda_manifest):
    assert lambda_manifest.name == "plugins.yaml"


@pytest.fixture
def my_dispatcher(lambda_dispatcher):
    return lambda_dispatcher


async def test_through_my_own_fixture(my_dispatcher):
    assert (await my_dispatcher.call("echo-lambda", "say", {"text": "y"}))["text"] == "y"
"""


@pytest.mark.docker
def test_the_kit_works_in_a_fresh_project_without_configuration(tmp_path: Path) -> None:
    project = tmp_path / "my-plugin"
    project.mkdir()
    (project / "conftest.py").write_text('pytest_plugins = ["dispatcher.testing.lambda_kit"]\n')
    (project / "plugins.yaml").write_text(
        yaml.safe_dump(echo_lambda_manifest("fresh-echo", greeting="fresh"))
    )
    (project / "test_my_plugin.py").write_text(textwrap.dedent(FRESH_TESTS))
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTEST_", "AWS_"))  # nothing of this run leaks into that one
    }
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python")])
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:dispatcher", "-p", "no:cacheprovider"],
        cwd=project,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0, output
    assert "5 passed" in output, output
    assert "configfile:" not in output  # truly no configuration: pytest-asyncio's defaults
    assert "asyncio: mode=Mode.STRICT" in output
    assert "requested async @pytest.fixture" not in output
