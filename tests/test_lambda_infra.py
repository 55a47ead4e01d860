"""``infra/lambda/`` and the deploy package, checked without a running Lambda."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import yaml

from dispatcher import parse_manifest
from dispatcher.config import PluginSpec
from providers.aws_lambda import LambdaDeploySettings, LambdaTarget
from providers.aws_lambda.package import HANDLER, build_package, describe_function, function_spec
from tests.conftest import ROOT
from tests.lambda_support import echo_lambda_manifest

INFRA = ROOT / "infra" / "lambda"


def echo_plugin(document: dict[str, Any] | None = None) -> tuple[PluginSpec[Any], LambdaTarget]:
    """The example plugin's manifest entry and its lambda target."""
    manifest = parse_manifest(document or echo_lambda_manifest(), base_dir=ROOT)
    plugin = manifest.plugins[0]
    assert isinstance(plugin.target, LambdaTarget)
    return plugin, plugin.target


def test_the_package_is_reproducible() -> None:
    plugin, target = echo_plugin()
    first = build_package(plugin, target)
    again = build_package(plugin, target)
    assert first.code_sha256 == again.code_sha256


def test_the_package_carries_the_plugin_sdk_and_nothing_of_the_host() -> None:
    plugin, target = echo_plugin()
    package = build_package(plugin, target)
    names = package.names()
    assert len(names) == package.files
    tops = {name.partition("/")[0] for name in names}
    assert {"echo_plugin.py", "linchkit_handler.py", "linchkit_plugin", "orjson"} <= tops
    assert tops - {"echo_plugin.py", "linchkit_handler.py", "linchkit_plugin", "orjson"} == {
        name for name in tops if name.startswith("orjson-") and name.endswith(".dist-info")
    }
    sdk = {name for name in names if name.startswith("linchkit_plugin/")}
    assert {"linchkit_plugin/__init__.py", "linchkit_plugin/aws_lambda.py"} <= sdk
    assert not any("_proto" in name or "grpc" in name or "knative" in name for name in sdk)
    assert len(package.zip_bytes) <= 1_500_000


def test_the_handler_imports_from_the_zip_alone(tmp_path: Path) -> None:
    """Unzipped, with no site-packages and nothing of this checkout on the path."""
    plugin, target = echo_plugin()
    package = build_package(plugin, target)
    with zipfile.ZipFile(io.BytesIO(package.zip_bytes)) as archive:
        archive.extractall(tmp_path)
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import linchkit_handler; "
        "print(sorted({m.partition('.')[0] for m in sys.modules} & "
        "{'dispatcher', 'providers', 'pydantic', 'aiohttp'}))"
    )
    ran = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code],
        cwd=tmp_path,
        env={"LINCHKIT_PLUGIN_CONFIG": '{"greeting": "zip"}'},
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "[]"


def test_the_sam_template_describes_the_function_deploy_makes() -> None:
    template = yaml.safe_load((INFRA / "template.yaml").read_text())
    parameters = template["Parameters"]
    function = template["Resources"]["PluginFunction"]["Properties"]
    role = template["Resources"]["PluginExecutionRole"]["Properties"]
    plugin, target = echo_plugin(
        echo_lambda_manifest(
            parameters["FunctionName"]["Default"],
            greeting=json.loads(parameters["PluginConfig"]["Default"])["greeting"],
            timeout_s=LambdaDeploySettings.model_fields["timeout_s"].default,
        )
    )
    spec = function_spec(plugin, target)
    assert function["Handler"] == spec.handler == HANDLER
    assert function["Runtime"] == spec.runtime
    assert function["Architectures"] == [spec.architecture]
    assert function["MemorySize"] == spec.memory_mb
    assert function["Timeout"] == spec.timeout_s
    assert function["AutoPublishAlias"] == spec.alias == target.qualifier
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


def test_describe_function_shows_the_function_without_asking_aws() -> None:
    plugin, target = echo_plugin()
    package = build_package(plugin, target)
    text = describe_function(function_spec(plugin, target), package)
    assert "function echo-plugin (x86_64)" in text
    assert f"Handler: {HANDLER}" in text
    assert build_package(plugin, target).code_sha256 in text
    assert "Environment: LINCHKIT_PLUGIN_CONFIG" in text
