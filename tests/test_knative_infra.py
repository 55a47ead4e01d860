"""``infra/knative/``: the Knative demo's plugin Service, committed as ``dispatcher deploy``
renders it, and rendered again here so the file cannot drift from the code that makes it.

When this fails because the rendering changed on purpose, write the file again with
``python examples/knative_demo.py --write-infra`` and commit it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import yaml

from dispatcher import parse_manifest
from providers.knative import KnativeDeployer
from tests.conftest import ROOT

COMMITTED = ROOT / "infra" / "knative" / "plugins" / "echo.yaml"
REWRITE = "python examples/knative_demo.py --write-infra"


def knative_demo() -> ModuleType:
    """``examples/knative_demo.py``, a script rather than a package module."""
    name = "knative_demo"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "knative_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_the_committed_service_is_what_the_demo_renders_now(tmp_path: Path) -> None:
    demo = knative_demo()
    written = asyncio.run(demo.write_infra(tmp_path))
    # Where ``dispatcher deploy`` run from the repository's root writes it.
    assert demo.INFRA_DIR / written.relative_to(tmp_path) == COMMITTED
    assert COMMITTED.is_file(), f"{COMMITTED} is missing: {REWRITE}"
    assert COMMITTED.read_text(encoding="utf-8") == written.read_text(encoding="utf-8"), (
        f"{COMMITTED.relative_to(ROOT)} differs from what the demo renders: {REWRITE}"
    )


def test_dispatcher_deploy_finds_the_committed_file_unchanged() -> None:
    demo = knative_demo()
    # The ingress is where calls go, not part of the Service.
    for ingress in ("http://127.0.0.1:8080", "http://knative.example.com"):
        echo = parse_manifest(demo.demo_manifest(ingress), base_dir=ROOT).plugins[0]
        plan = asyncio.run(KnativeDeployer(demo.INFRA_DIR).plan(echo, echo.target))
        assert plan.steps[0].action == "unchanged", (plan.steps[0].render(), REWRITE)
        assert plan.document == COMMITTED.read_text(encoding="utf-8")


def test_the_committed_service_is_the_demos_echo_with_its_canary() -> None:
    service = yaml.safe_load(COMMITTED.read_text(encoding="utf-8"))
    assert service["apiVersion"] == "serving.knative.dev/v1"
    assert service["metadata"]["name"] == "echo"
    assert service["metadata"]["namespace"] == "plugins"
    template = service["spec"]["template"]
    assert template["metadata"]["name"] == "echo-1-1-0"
    (container,) = template["spec"]["containers"]
    assert container["image"] == "registry.example.com/plugins/echo:1.1.0"
    traffic = {entry["tag"]: entry["percent"] for entry in service["spec"]["traffic"]}
    assert traffic == {"stable": 90, "canary": 10}
