"""``dispatcher deploy`` against moto's control plane, the deployed code run by the real runtime.

Deploys go through the seam the CLI uses: ``LambdaProvider().deployer()`` (plan, apply,
remove). Also checks that ``infra/lambda/`` (the IAM policy and the SAM template) agrees with what
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
from dispatcher.testing.lambda_kit import create_role, point_at, reset_moto
from dispatcher.testing.local_lambda import LocalLambda
from providers.aws_lambda import LambdaDeployer, LambdaProvider
from providers.aws_lambda.package import Package
from providers.deploy import Plan, Step
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


def actions(plan: Plan) -> dict[str, str]:
    """Each step's action by the kind of resource it changes (``function``, ``alias`` …)."""
    return {step.resource.partition(" ")[0]: step.action for step in plan.steps}


def details(plan: Plan, kind: str) -> list[str]:
    return [step.detail for step in plan.steps if step.resource.partition(" ")[0] == kind]


async def deploy(
    manifest: Any, *, dry_run: bool = False, remove: bool = False, progress: Any = None
) -> Plan:
    """What ``dispatcher deploy`` does for the manifest's one plugin, through the seam."""
    [plugin] = manifest.plugins
    provider = LambdaProvider()
    deployer = provider.deployer()
    assert isinstance(deployer, LambdaDeployer)
    async with provider:
        if dry_run:
            return await deployer.plan(plugin, plugin.target)
        if remove:
            return await deployer.remove(plugin, plugin.target, progress)
        return await deployer.apply(plugin, plugin.target, progress)


async def test_deploying_twice_changes_nothing_the_second_time(local: LocalLambda) -> None:
    manifest = manifest_for(local, "deploy-twice")
    reported: list[Step] = []
    first = await deploy(manifest, progress=reported.append)
    assert first.changes
    assert list(first.steps) == reported  # each step went to progress as it ended
    assert actions(first) == {"function": "create", "version": "publish", "alias": "create"}
    assert [step.resource for step in first.steps] == [
        "function deploy-twice",
        "version deploy-twice",
        "alias deploy-twice:live",
    ]
    assert details(first, "alias") == ["→ 1"]
    second = await deploy(manifest)
    assert not second.changes
    assert actions(second) == {
        "code": "unchanged",
        "configuration": "unchanged",
        "version": "unchanged",
        "alias": "unchanged",
    }
    async with Dispatcher(manifest) as dispatcher:
        answer = await dispatcher.call("echo-lambda", "say", {"text": "deployed"})
    assert answer["greeting"] == "from lambda"


async def test_a_changed_config_publishes_a_version_and_moves_the_alias(
    local: LocalLambda,
) -> None:
    await deploy(manifest_for(local, "deploy-change"))
    changed = manifest_for(local, "deploy-change", greeting="changed")
    plan = await deploy(changed)
    assert actions(plan)["code"] == "unchanged"
    assert actions(plan)["configuration"] == "update"
    assert details(plan, "configuration") == ["Environment"]
    assert actions(plan)["version"] == "publish"
    assert details(plan, "alias") == ["1 → 2"]
    assert actions(plan)["alias"] == "move"
    async with Dispatcher(changed) as dispatcher:
        answer = await dispatcher.call("echo-lambda", "say", {"text": "hi"})
    assert answer["greeting"] == "changed"


async def test_a_dry_run_shows_the_plan_and_changes_nothing(local: LocalLambda) -> None:
    manifest = manifest_for(local, "deploy-dry")
    plan = await deploy(manifest, dry_run=True)
    assert actions(plan) == {"function": "create", "version": "publish", "alias": "create"}
    assert plan.changes
    assert "Handler: linchkit_handler.handler" in plan.document
    target = manifest.plugins[0].target
    async with LambdaProvider() as provider:
        health = await provider.health(target)
    assert health.status == "not_serving"
    assert "does not exist" in health.detail
    # Planned against what is live: after a deploy, the plan of the same is all unchanged.
    await deploy(manifest)
    again = await deploy(manifest, dry_run=True)
    assert not again.changes
    assert set(actions(again).values()) == {"unchanged"}
    moved = await deploy(manifest_for(local, "deploy-dry", greeting="planned"), dry_run=True)
    assert actions(moved)["configuration"] == "update"
    assert actions(moved)["alias"] == "move"
    async with Dispatcher(manifest) as dispatcher:  # the plan wrote nothing
        answer = await dispatcher.call("echo-lambda", "say", {"text": "hi"})
    assert answer["greeting"] == "from lambda"


async def test_remove_deletes_what_apply_created(local: LocalLambda) -> None:
    manifest = manifest_for(local, "deploy-remove")
    await deploy(manifest)
    await deploy(manifest_for(local, "deploy-remove", greeting="second"))
    reported: list[Step] = []
    removed = await deploy(manifest, remove=True, progress=reported.append)
    assert [step.render() for step in removed.steps] == [
        "delete alias deploy-remove:live",
        "delete function deploy-remove (versions 1, 2)",
    ]
    assert list(removed.steps) == reported
    async with LambdaProvider() as provider:
        health = await provider.health(manifest.plugins[0].target)
    assert "does not exist" in health.detail
    nothing = await deploy(manifest, remove=True)
    assert nothing.steps == ()
    assert not nothing.changes


async def test_deploy_calls_exactly_the_actions_of_the_iam_policy(local: LocalLambda) -> None:
    called: set[str] = set()

    def record(model: Any, **_: Any) -> None:
        called.add(f"lambda:{model.name}")

    # A first deploy (create), one that changes code and configuration, a plan and a
    # removal: every path.
    first = manifest_for(local, "echo-plugin")
    second = manifest_for(local, "echo-plugin", greeting="other")
    provider = LambdaProvider()
    deployer = provider.deployer()
    async with provider:
        client = await provider.client(first.plugins[0].target, control_plane=True)
        client.meta.events.register("before-call.lambda.*", record)
        plugin = first.plugins[0]
        await deployer.apply(plugin, plugin.target)
        # One more vendored distribution changes the code; the greeting, the config.
        settings = second.plugins[0].target.deploy.model_copy(
            update={"requirements": ["packaging"]}
        )
        changed_target = second.plugins[0].target.model_copy(update={"deploy": settings})
        assert actions(await deployer.plan(second.plugins[0], changed_target))["code"] == "update"
        changed = await deployer.apply(second.plugins[0], changed_target)
        assert actions(changed)["code"] == "update"
        await deployer.remove(plugin, plugin.target)
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
    assert "echo-lambda@1.0.0: lambda deploy-cli:live (us-east-1)\n" in planned
    assert "  create function deploy-cli (python3.11, " in planned
    assert "  Handler: linchkit_handler.handler" in planned
    done = await run()
    assert "echo-lambda@1.0.0: create alias deploy-cli:live (→ 1)" in done
    assert "echo-lambda@1.0.0: deployed lambda deploy-cli:live (us-east-1)" in done
    again = await run()
    assert "echo-lambda@1.0.0: lambda deploy-cli:live (us-east-1): up to date" in again
    removed = await run("--remove")
    assert "echo-lambda@1.0.0: delete function deploy-cli (versions 1)" in removed
    assert "echo-lambda@1.0.0: removed lambda deploy-cli:live (us-east-1)" in removed
    assert "nothing to remove" in await run("--remove")


async def test_litter_in_the_plugin_folder_publishes_no_new_version(
    local: LocalLambda, tmp_path: Path
) -> None:
    """The bug this guards against: a log file growing in the plugin's folder went into
    the zip, so every deploy uploaded new code and published a version."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "echo_plugin.py").write_bytes((ROOT / "examples/python/echo_plugin.py").read_bytes())
    (folder / ".dispatcherignore").write_text("scratch/\n")
    manifest = manifest_for(local, "deploy-litter", path=str(folder))
    first = await deploy(manifest)
    assert actions(first)["version"] == "publish"
    # The plugin ran, wrote its log; a test run, an editor and a checkout touched the rest.
    (folder / "plugin.log").write_text("INFO started\n" * 1000)
    (folder / "scratch").mkdir()
    (folder / "scratch" / "notes.txt").write_text("try 6 MB payloads\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "echo_plugin.cpython-311.pyc").write_bytes(b"\x00" * 64)
    for path in folder.rglob("*"):
        os.utime(path, (1_900_000_000, 1_900_000_000))
    planned = await deploy(manifest, dry_run=True)
    assert not planned.changes, planned.render()
    second = await deploy(manifest)
    assert not second.changes, second.render()
    assert details(second, "version") == ["1 has this code and configuration"]
    async with LambdaProvider() as provider:
        client = await provider.client(manifest.plugins[0].target)
        versions = await client.list_versions_by_function(FunctionName="deploy-litter")
    assert [v["Version"] for v in versions["Versions"]] == ["$LATEST", "1"]
    # A file that is code does change it.
    (folder / "helpers.py").write_text("VALUE = 1\n")
    third = await deploy(manifest)
    assert actions(third)["code"] == "update"
    assert details(third, "version") == ["2"]


async def test_the_package_only_zip_is_the_code_deploy_uploads(
    local: LocalLambda, tmp_path: Path
) -> None:
    """What `deploy --package-only` writes (for SAM) is what `deploy` puts on Lambda."""
    manifest_file = tmp_path / "plugins.yaml"
    manifest_file.write_text(
        yaml.safe_dump(point_at(echo_lambda_manifest("deploy-zip"), local.url))
    )
    command = [sys.executable, "-m", "dispatcher.cli", "-m", str(manifest_file), "deploy"]
    for extra in (["--package-only", "--out", str(tmp_path / "build")], []):
        process = await asyncio.create_subprocess_exec(
            *command, *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await process.communicate()
        assert process.returncode == 0, output.decode()
    zip_bytes = (tmp_path / "build" / "deploy-zip.zip").read_bytes()
    manifest = parse_manifest(yaml.safe_load(manifest_file.read_text()), base_dir=tmp_path)
    async with LambdaProvider() as provider:
        client = await provider.client(manifest.plugins[0].target)
        deployed = await client.get_function_configuration(FunctionName="deploy-zip")
    assert deployed["CodeSha256"] == Package(zip_bytes, 0).code_sha256
    async with Dispatcher(manifest) as dispatcher:
        assert (await dispatcher.call("echo-lambda", "say", {"text": "zip"}))["text"] == "zip"
