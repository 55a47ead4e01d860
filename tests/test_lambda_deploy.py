"""``dispatcher deploy`` against moto's control plane, the deployed code run by the real runtime.

Also checks that ``infra/lambda/`` (the IAM policy and the SAM template) agrees with what
deploy does.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from dispatcher import Dispatcher, parse_manifest
from dispatcher.deploy import deploy_plugin, deploy_targets
from dispatcher.testing.lambda_kit import create_role, point_at, reset_moto
from dispatcher.testing.local_lambda import LocalLambda
from providers.aws_lambda import LambdaProvider
from tests.conftest import ROOT
from tests.lambda_support import ROLE, echo_lambda_manifest

pytestmark = pytest.mark.asyncio(loop_scope="module")

INFRA = ROOT / "infra" / "lambda"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def local(moto_server: str) -> AsyncIterator[LocalLambda]:
    await reset_moto(moto_server)
    async with LocalLambda(moto_server) as local_lambda:
        await create_role(local_lambda.url, ROLE.rpartition("/")[2])
        yield local_lambda


def manifest_for(local: LocalLambda, function_name: str, **options: Any) -> Any:
    document = point_at(echo_lambda_manifest(function_name, **options), local.url)
    return parse_manifest(document, base_dir=ROOT)


def actions(steps: list[Any]) -> dict[str, str]:
    return {step.name: step.action for step in steps}


async def test_deploying_twice_changes_nothing_the_second_time(local: LocalLambda) -> None:
    manifest = manifest_for(local, "deploy-twice")
    first = await deploy_targets(manifest)
    assert actions(first[0].steps) == {
        "package": "built",
        "function": "create",
        "active": "waited",
        "version": "published",
        "alias": "create",
    }
    second = await deploy_targets(manifest)
    assert not second[0].changed
    assert actions(second[0].steps) == {
        "package": "built",
        "code": "unchanged",
        "config": "unchanged",
        "active": "waited",
        "version": "unchanged",
        "alias": "unchanged",
    }
    async with Dispatcher(manifest) as dispatcher:
        answer = await dispatcher.call("echo-lambda", "say", {"text": "deployed"})
    assert answer["greeting"] == "from lambda"


async def test_a_changed_config_publishes_a_version_and_moves_the_alias(
    local: LocalLambda,
) -> None:
    await deploy_targets(manifest_for(local, "deploy-change"))
    changed = manifest_for(local, "deploy-change", greeting="changed")
    steps = (await deploy_targets(changed))[0].steps
    assert actions(steps)["code"] == "unchanged"
    assert actions(steps)["config"] == "update"
    assert [step.detail for step in steps if step.name == "config"] == ["Environment"]
    assert actions(steps)["version"] == "published"
    assert [step.detail for step in steps if step.name == "alias"] == ["live: 1 → 2"]
    async with Dispatcher(changed) as dispatcher:
        answer = await dispatcher.call("echo-lambda", "say", {"text": "hi"})
    assert answer["greeting"] == "changed"


async def test_a_dry_run_shows_the_plan_and_changes_nothing(local: LocalLambda) -> None:
    manifest = manifest_for(local, "deploy-dry")
    steps = (await deploy_targets(manifest, dry_run=True))[0].steps
    assert actions(steps) == {
        "package": "built",
        "function": "would create",
        "active": "would wait",
        "version": "would publish",
        "alias": "would create",
    }
    target = manifest.plugins[0].target
    async with LambdaProvider() as provider:
        health = await provider.health(target)
    assert health.status == "not_serving"
    assert "does not exist" in health.detail


async def test_deploy_calls_exactly_the_actions_of_the_iam_policy(local: LocalLambda) -> None:
    called: set[str] = set()

    def record(model: Any, **_: Any) -> None:
        called.add(f"lambda:{model.name}")

    # A first deploy (create) and one that changes code and configuration: every path.
    first = manifest_for(local, "echo-plugin")
    second = manifest_for(local, "echo-plugin", greeting="other")
    async with LambdaProvider() as provider:
        client = await provider.client(first.plugins[0].target)
        client.meta.events.register("before-call.lambda.*", record)
        plugin = first.plugins[0]
        await deploy_plugin(provider, plugin, plugin.target)
        # One more vendored distribution changes the code; the greeting, the config.
        settings = second.plugins[0].target.deploy.model_copy(
            update={"requirements": ["packaging"]}
        )
        changed_target = second.plugins[0].target.model_copy(update={"deploy": settings})
        await deploy_plugin(provider, second.plugins[0], changed_target)
    policy = json.loads((INFRA / "deploy-policy.json").read_text())
    lambda_statement, pass_role = policy["Statement"]
    assert set(lambda_statement["Action"]) == called
    assert all(action.startswith("lambda:") and "*" not in action for action in called)
    assert f"function:{plugin.target.function_name}" in lambda_statement["Resource"][0]
    assert pass_role["Action"] == "iam:PassRole"
    assert pass_role["Resource"].endswith(":role/" + ROLE.rpartition("/")[2])
    assert pass_role["Condition"]["StringEquals"]["iam:PassedToService"] == "lambda.amazonaws.com"


async def test_the_cli_deploys_then_reports_up_to_date(local: LocalLambda, tmp_path: Path) -> None:
    document = point_at(echo_lambda_manifest("deploy-cli"), local.url)
    manifest_file = tmp_path / "plugins.yaml"
    manifest_file.write_text(yaml.safe_dump(document))
    command = [sys.executable, "-m", "dispatcher.cli", "-m", str(manifest_file), "deploy"]

    async def run(*extra: str) -> str:
        process = await asyncio.create_subprocess_exec(
            *command,
            *extra,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ},
        )
        output, _ = await process.communicate()
        assert process.returncode == 0, output.decode()
        return output.decode()

    planned = await run("--dry-run")
    assert "echo-lambda@1.0.0: function  would create" in planned
    assert "lambda deploy-cli:live (us-east-1): would change" in planned
    done = await run()
    assert "echo-lambda@1.0.0: alias     create           live → 1" in done
    assert "echo-lambda@1.0.0: lambda deploy-cli:live (us-east-1): deployed" in done
    again = await run()
    assert "up to date: nothing changed" in again
