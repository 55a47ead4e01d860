"""``infra/lambda/`` and the deploy package, checked without a running Lambda."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from dispatcher import parse_manifest
from dispatcher.deploy import HANDLER, build_package, function_spec
from providers.aws_lambda import LambdaDeploySettings
from tests.conftest import ROOT
from tests.lambda_support import echo_lambda_manifest

INFRA = ROOT / "infra" / "lambda"


def test_the_package_is_reproducible() -> None:
    manifest = parse_manifest(echo_lambda_manifest(), base_dir=ROOT)
    plugin = manifest.plugins[0]
    first = build_package(plugin, plugin.target)
    again = build_package(plugin, plugin.target)
    assert first.code_sha256 == again.code_sha256
    assert first.files > 100  # the plugin, the SDK and its dependencies


def test_the_sam_template_describes_the_function_deploy_makes() -> None:
    template = yaml.safe_load((INFRA / "template.yaml").read_text())
    parameters = template["Parameters"]
    function = template["Resources"]["PluginFunction"]["Properties"]
    role = template["Resources"]["PluginExecutionRole"]["Properties"]
    manifest = parse_manifest(
        echo_lambda_manifest(
            parameters["FunctionName"]["Default"],
            greeting=json.loads(parameters["PluginConfig"]["Default"])["greeting"],
            timeout_s=LambdaDeploySettings.model_fields["timeout_s"].default,
        ),
        base_dir=ROOT,
    )
    plugin = manifest.plugins[0]
    spec = function_spec(plugin, plugin.target)
    assert function["Handler"] == spec.handler == HANDLER
    assert function["Runtime"] == spec.runtime
    assert function["Architectures"] == [spec.architecture]
    assert function["MemorySize"] == spec.memory_mb
    assert function["Timeout"] == spec.timeout_s
    assert function["AutoPublishAlias"] == spec.alias == plugin.target.qualifier
    assert function["Description"] == spec.description
    assert function["Role"] == {"Fn::GetAtt": ["PluginExecutionRole", "Arn"]}
    assert spec.role.endswith(":role/" + role["RoleName"])
    assert set(function["Environment"]["Variables"]) == set(spec.environment)
    assert json.loads(parameters["PluginConfig"]["Default"]) == json.loads(
        spec.environment["LINCHKIT_PLUGIN_CONFIG"]
    )
    # The execution role may write the function's logs and nothing else.
    granted = {
        action
        for policy in role["Policies"]
        for statement in policy["PolicyDocument"]["Statement"]
        for action in (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
    }
    assert granted == {"logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"}


def test_deploy_without_deploy_settings_or_with_an_unknown_plugin(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dispatcher.cli import main

    document = echo_lambda_manifest()
    del document["plugins"][0]["target"]["deploy"]
    manifest = tmp_path / "plugins.yaml"
    manifest.write_text(yaml.safe_dump(document))
    runner = CliRunner()
    unset = runner.invoke(main, ["-m", str(manifest), "deploy", "--dry-run"])
    assert unset.exit_code == 1, unset.output
    assert "has no 'deploy' settings (role, entrypoint, path)" in unset.output
    unknown = runner.invoke(main, ["-m", str(manifest), "deploy", "nope"])
    assert unknown.exit_code == 2
    assert "not in the manifest: nope" in unknown.output


def test_render_deployment_shows_the_function_without_asking_aws() -> None:
    from providers.aws_lambda import LambdaProvider

    manifest = parse_manifest(echo_lambda_manifest(), base_dir=ROOT)
    plugin = manifest.plugins[0]
    text = LambdaProvider().render_deployment(plugin, plugin.target)
    assert "function echo-plugin (x86_64)" in text
    assert f"Handler: {HANDLER}" in text
    assert build_package(plugin, plugin.target).code_sha256 in text
    assert "Environment: LINCHKIT_PLUGIN_CONFIG" in text
