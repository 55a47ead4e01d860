"""A third-party provider imports our provider seam first: that must work on its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, ROOT


@pytest.mark.parametrize(
    "module",
    ["providers", "providers.base", "providers.http", "linchkit_plugin.errors", "dispatcher"],
)
def test_each_public_module_imports_on_its_own(module: str) -> None:
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)


def test_importing_the_dispatcher_does_not_load_the_http_client() -> None:
    code = "import sys, dispatcher; dispatcher.Dispatcher; print('aiohttp' in sys.modules)"
    ran = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert ran.stdout.strip() == "False"


def test_the_cli_loads_jsonschema_only_for_a_manifest_with_a_schema(tmp_path: Path) -> None:
    # jsonschema, with attrs and referencing, was a fifth of every CLI start's imports.
    manifest = tmp_path / "plugins.yaml"
    plugin = f"{{id: echo, version: 1.0.0, target: {{provider: local, entrypoint: 'echo_plugin:EchoPlugin', path: '{EXAMPLES}'}}"
    code = (
        "import sys; from dispatcher.cli import main; from dispatcher.config import load_manifest;"
        f" load_manifest({str(manifest)!r}); print('jsonschema' in sys.modules)"
    )
    for methods, loaded in [
        ("{say: {}}", "False"),
        ("{say: {params_schema: {type: object}}}", "True"),
    ]:
        manifest.write_text(f"version: 1\nplugins:\n  - {plugin}, methods: {methods}}}\n")
        ran = subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
        )
        assert ran.stdout.strip() == loaded, methods


PROVIDER_MODULES = [
    "providers.local",
    "providers.http",
    "providers.grpc",
    "providers.subprocess.provider",
    "providers.docker",
    "providers.knative",
    "providers.aws_lambda",
    "providers.websocket",
    "providers.wasm",
]


@pytest.mark.parametrize(
    ("targets", "imported"),
    [
        # The providers the targets name, and only those: building all nine target models
        # was a fifth of a CLI's start.
        (["{provider: http, url: 'http://127.0.0.1:9/'}"], ["providers.http"]),
        (
            [
                "{provider: http, url: 'http://127.0.0.1:9/'}",
                "{provider: grpc, address: '127.0.0.1:9'}",
            ],
            ["providers.grpc", "providers.http"],
        ),
        # A target that names no known provider: all of them, for the problem to list them.
        (["{provider: ftp, url: 'ftp://127.0.0.1/'}"], PROVIDER_MODULES),
        (["{url: 'http://127.0.0.1:9/'}"], PROVIDER_MODULES),
    ],
)
def test_a_manifest_load_imports_the_providers_its_targets_name(
    tmp_path: Path, targets: list[str], imported: list[str]
) -> None:
    manifest = tmp_path / "plugins.yaml"
    plugins = "".join(
        f"  - {{id: p{index}, version: 1.0.0, target: {target}, methods: {{say: {{}}}}}}\n"
        for index, target in enumerate(targets)
    )
    manifest.write_text(f"version: 1\nplugins:\n{plugins}")
    code = (
        "import sys; from dispatcher.cli import main; from dispatcher.config import load_manifest\n"
        f"try: load_manifest({str(manifest)!r})\n"
        "except Exception as error: print(type(error).__name__, file=sys.stderr)\n"
        f"print(' '.join(sorted(m for m in {PROVIDER_MODULES!r} if m in sys.modules)))"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
    )
    assert ran.stdout.split() == sorted(imported), ran.stderr
    assert ran.stderr.strip() in ("", "ManifestError"), ran.stderr
