"""``infra/lambda/`` and the deploy package, checked without a running Lambda."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
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
    assert "not in the manifest: 'nope'" in unknown.output


def test_describe_function_shows_the_function_without_asking_aws() -> None:
    plugin, target = echo_plugin()
    package = build_package(plugin, target)
    text = describe_function(function_spec(plugin, target), package)
    assert "function echo-plugin (x86_64)" in text
    assert f"Handler: {HANDLER}" in text
    assert build_package(plugin, target).code_sha256 in text
    assert "Environment: LINCHKIT_PLUGIN_CONFIG" in text


def test_package_only_writes_the_zip_the_sam_template_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is contacted: the endpoint is a closed port and there are no credentials."""
    from click.testing import CliRunner

    from dispatcher.cli import main

    parameters = yaml.safe_load((INFRA / "template.yaml").read_text())["Parameters"]
    function_name = parameters["FunctionName"]["Default"]
    assert parameters["CodeUri"]["Default"] == f"build/{function_name}.zip"
    assert "--package-only" in parameters["CodeUri"]["Description"]
    document = echo_lambda_manifest(function_name, endpoint_url="http://127.0.0.1:9")
    runner = CliRunner(env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None})
    monkeypatch.chdir(tmp_path)  # the default --out is relative to where it runs
    Path("plugins.yaml").write_text(yaml.safe_dump(document))
    written = runner.invoke(main, ["deploy", "--package-only"])
    assert written.exit_code == 0, written.output
    zip_file = tmp_path / parameters["CodeUri"]["Default"]
    assert f"echo-lambda@1.0.0: wrote build/{function_name}.zip (" in written.output
    plugin, target = echo_plugin(document)
    assert zip_file.read_bytes() == build_package(plugin, target).zip_bytes
    assert [path.name for path in zip_file.parent.iterdir()] == [zip_file.name]  # no partials
    # Elsewhere, and again: the same bytes.
    again = runner.invoke(main, ["deploy", "--package-only", "--out", "elsewhere/zips"])
    assert again.exit_code == 0, again.output
    assert Path("elsewhere/zips", zip_file.name).read_bytes() == zip_file.read_bytes()


def test_package_only_refuses_other_modes_and_skips_what_has_no_package(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dispatcher.cli import main

    document = echo_lambda_manifest()
    document["plugins"].append(
        {
            "id": "echo-local",
            "version": "1.0.0",
            "target": {"provider": "local", "entrypoint": "echo_plugin:EchoPlugin"},
            "methods": {"say": {}},
        }
    )
    manifest = tmp_path / "plugins.yaml"
    manifest.write_text(yaml.safe_dump(document))
    runner = CliRunner()
    for other in ("--dry-run", "--remove"):
        refused = runner.invoke(main, ["-m", str(manifest), "deploy", "--package-only", other])
        assert refused.exit_code == 2
        assert "--package-only writes the package only" in refused.output
    out = tmp_path / "out"
    both = runner.invoke(main, ["-m", str(manifest), "deploy", "--package-only", "--out", str(out)])
    assert both.exit_code == 0, both.output
    assert "echo-local@1.0.0: local echo_plugin:EchoPlugin: nothing to package" in both.output
    assert [path.name for path in out.iterdir()] == ["echo-plugin.zip"]
    # An --out that is a file: one line, exit 1, no traceback.
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    failed = runner.invoke(
        main,
        [
            "-m",
            str(manifest),
            "deploy",
            "echo-lambda",
            "--package-only",
            "--out",
            str(blocked / "x"),
        ],
    )
    assert failed.exit_code == 1, failed.output
    assert "echo-lambda@1.0.0: cannot write into" in failed.output
    assert failed.exception is None or isinstance(failed.exception, SystemExit)


def test_bare_function_names() -> None:
    from providers.aws_lambda.package import bare_function_name

    assert bare_function_name("echo") == "echo"
    assert bare_function_name("echo:live") == "echo"
    assert bare_function_name("arn:aws:lambda:eu-west-1:123456789012:function:echo") == "echo"
    assert bare_function_name("arn:aws:lambda:eu-west-1:123456789012:function:echo:7") == "echo"
