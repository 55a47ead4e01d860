"""``dispatcher.testing``, used the way a plugin author would: override the manifest, ask
for ``lambda_dispatcher``, call the plugin deployed to the local Lambda."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dispatcher import Dispatcher
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
