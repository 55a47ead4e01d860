"""``dispatcher deploy`` for knative targets: render, validate against the CRD schema, apply.

Rendered Services are checked against the Knative Serving CRD's OpenAPI schema kept in
``providers/knative/schemas/``. Applying goes through the real kubernetes-asyncio client to a local
stand-in of the Kubernetes API server (below), since no cluster can run here.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner

from dispatcher import Forbidden, InvalidParams, ManifestError, ProviderError, parse_manifest
from dispatcher.cli import main
from providers.deploy import Step
from providers.knative import KnativeDeployer, KnativeProvider
from providers.knative.service import render_service, revision_name, validate_service
from tests.conftest import ROOT, manifest

TOKEN = "test-token"


def plugin_entry(deploy: dict[str, Any], **target: Any) -> dict[str, Any]:
    return {
        "id": "ledger",
        "version": "1.2.0",
        "config": {"greeting": "from knative"},
        "target": {
            "provider": "knative",
            "ingress": "http://127.0.0.1:8080",
            "service": "ledger",
            "namespace": "plugins",
            "deploy": deploy,
            **target,
        },
        "methods": {"whoami": {}},
    }


FULL_DEPLOY: dict[str, Any] = {
    "image": "registry.example.com/plugins/ledger:1.2.0",
    "args": ["ledger_plugin:LedgerPlugin"],
    "env": {"LOG_LEVEL": "info"},
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"cpu": "1", "memory": "256Mi"},
    "container_concurrency": 10,
    "min_scale": 0,
    "max_scale": 5,
    "timeout_seconds": 30,
    "port": 8080,
    "canary": {"stable_version": "1.1.0", "percent": 10},
}


def one(deploy: dict[str, Any], **target: Any) -> tuple[Any, Any]:
    plugin = manifest(plugin_entry(deploy, **target)).plugins[0]
    return plugin, plugin.target


def test_rendered_service_matches_the_crd_schema_and_the_manifest() -> None:
    plugin, target = one(FULL_DEPLOY)
    service = render_service(plugin, target)
    validate_service(service)
    template = service["spec"]["template"]
    container = template["spec"]["containers"][0]
    assert service["apiVersion"] == "serving.knative.dev/v1"
    assert service["metadata"]["name"] == "ledger"
    assert service["metadata"]["namespace"] == "plugins"
    assert template["metadata"]["name"] == "ledger-1-2-0"
    assert template["metadata"]["annotations"] == {
        "autoscaling.knative.dev/min-scale": "0",
        "autoscaling.knative.dev/max-scale": "5",
    }
    assert template["spec"]["containerConcurrency"] == 10
    assert template["spec"]["timeoutSeconds"] == 30
    assert container["image"] == FULL_DEPLOY["image"]
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "256Mi"},
    }
    assert {"name": "LINCHKIT_PLUGIN_CONFIG", "value": '{"greeting":"from knative"}'} in container[
        "env"
    ]
    assert container["readinessProbe"] == {"httpGet": {"path": "/health/readiness"}}
    assert service["spec"]["traffic"] == [
        {"revisionName": "ledger-1-1-0", "latestRevision": False, "percent": 90, "tag": "stable"},
        {"latestRevision": True, "percent": 10, "tag": "canary"},
    ]


def test_without_canary_all_traffic_goes_to_the_latest_revision() -> None:
    plugin, target = one({"image": "ledger:1"}, mode="envelope")
    service = render_service(plugin, target)
    validate_service(service)
    assert service["spec"]["traffic"] == [{"latestRevision": True, "percent": 100}]
    container = service["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"] == {"httpGet": {"path": "/health"}}
    assert "resources" not in container


@pytest.mark.parametrize(
    ("path", "value", "complaint"),
    [
        (("spec", "template", "spec", "containerConcurrency"), "10", "is not of type 'integer'"),
        (("spec", "traffic", 0, "percent"), 50, "percents must add up to 100"),
        (("spec", "traffic", 0, "weight"), 100, "Additional properties are not allowed"),
        (
            ("spec", "template", "spec", "containers", 0, "resources", "limits", "cpu"),
            "lots",
            "does not match",
        ),
        (
            ("spec", "template", "spec", "containers", 0, "env", 0, "name"),
            7,
            "is not of type 'string'",
        ),
        (("spec", "replicas"), 3, "Additional properties are not allowed"),
        (("metadata", "name"), "Ledger_Plugin", "DNS-1035"),
    ],
)
def test_schema_refuses_what_the_cluster_would(
    path: tuple[str | int, ...], value: Any, complaint: str
) -> None:
    plugin, target = one(FULL_DEPLOY | {"canary": None})
    service = render_service(plugin, target)
    node = service
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(InvalidParams, match=complaint):
        validate_service(service)


def test_manifest_refuses_bad_deploy_settings() -> None:
    with pytest.raises(ManifestError, match="min_scale 3 is above max_scale 2"):
        one({"image": "x", "min_scale": 3, "max_scale": 2})
    with pytest.raises(ManifestError, match="limits"):
        one({"image": "x", "limits": {"cpu": "a lot"}})
    with pytest.raises(ManifestError, match="service"):
        parse_manifest(
            {"plugins": [plugin_entry({"image": "x"}, service="Not_A_Label")]}, base_dir=ROOT
        )


def test_revision_names_follow_the_plugin_version() -> None:
    assert revision_name("ledger", "1.2.0-rc.1+build.5") == "ledger-1-2-0-rc-1-build-5"


def test_kubeconfig_is_taken_from_the_manifest_folder(tmp_path: Path) -> None:
    entry = plugin_entry({"image": "x", "cluster": {"kubeconfig": "kube/config"}})
    target = parse_manifest({"plugins": [entry]}, base_dir=tmp_path).plugins[0].target
    assert target.deploy.cluster.kubeconfig == tmp_path / "kube" / "config"
    entry = plugin_entry({"image": "x", "cluster": {"kubeconfig": "~/.kube/config"}})
    target = parse_manifest({"plugins": [entry]}, base_dir=tmp_path).plugins[0].target
    assert target.deploy.cluster.kubeconfig == Path.home() / ".kube" / "config"


async def test_provider_deploys_through_a_knative_deployer(tmp_path: Path) -> None:
    provider = KnativeProvider(infra_dir=tmp_path / "infra")
    deployer = provider.deployer()
    assert isinstance(deployer, KnativeDeployer)
    assert deployer.infra_dir == tmp_path / "infra"


async def test_plan_renders_the_service_and_writes_nothing(tmp_path: Path) -> None:
    plugin, target = one(FULL_DEPLOY)
    plan = await KnativeDeployer(tmp_path / "infra").plan(plugin, target)
    written = tmp_path / "infra" / "plugins" / "ledger.yaml"
    assert yaml.safe_load(plan.document) == render_service(plugin, target)
    assert plan.steps == (Step("write", str(written), "render only: no deploy.cluster"),)
    assert plan.target == "knative service plugins/ledger"
    assert not (tmp_path / "infra").exists()


async def test_apply_without_cluster_writes_infra_only_and_twice_changes_nothing(
    tmp_path: Path,
) -> None:
    plugin, target = one(FULL_DEPLOY)
    deployer = KnativeDeployer(tmp_path / "infra" / "knative")
    seen: list[Step] = []
    first = await deployer.apply(plugin, target, seen.append)
    written = tmp_path / "infra" / "knative" / "plugins" / "ledger.yaml"
    assert [step.action for step in first.steps] == ["write"]
    assert list(first.steps) == seen
    assert yaml.safe_load(written.read_text()) == render_service(plugin, target)
    second = await deployer.apply(plugin, target)
    assert not second.changes
    assert not (await deployer.plan(plugin, target)).changes
    removed = await deployer.remove(plugin, target)
    assert [(step.action, step.resource) for step in removed.steps] == [("delete", str(written))]
    assert not written.exists()
    again = await deployer.remove(plugin, target)
    assert not again.changes  # removing nothing is not an error


def test_a_target_without_deploy_settings_cannot_be_deployed(tmp_path: Path) -> None:
    entry = plugin_entry({"image": "x"})
    del entry["target"]["deploy"]
    plugin = manifest(entry).plugins[0]
    with pytest.raises(ProviderError, match="no 'deploy' section"):
        asyncio.run(KnativeDeployer(tmp_path).plan(plugin, plugin.target))


# -- apply through the Kubernetes API -----------------------------------------------------


class KubernetesApiStandIn:
    """EMULATION of the Kubernetes API server's custom-resource endpoints for Knative Services.

    Just what ``apply`` uses (https://kubernetes.io/docs/reference/using-api/api-concepts/):
    GET/POST/PUT on ``/apis/serving.knative.dev/v1/namespaces/{ns}/services[/{name}]``,
    bearer-token authentication (401), a namespace that may not be written (403),
    resourceVersion optimistic concurrency (409 on a stale PUT), and ``Status`` bodies.
    """

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.forbidden_namespaces = {"kube-system"}
        self.url = ""
        self._version = 0

    def app(self) -> web.Application:
        app = web.Application()
        base = "/apis/serving.knative.dev/v1/namespaces/{namespace}/services"
        app.router.add_post(base, self._create)
        app.router.add_get(base + "/{name}", self._get)
        app.router.add_put(base + "/{name}", self._replace)
        app.router.add_delete(base + "/{name}", self._delete)
        return app

    @staticmethod
    def status(code: int, reason: str, message: str) -> web.Response:
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                "reason": reason, "code": code}  # fmt: skip
        return web.json_response(body, status=code)

    def _check(self, request: web.Request) -> web.Response | None:
        self.requests.append((request.method, request.path))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.status(401, "Unauthorized", "Unauthorized")
        if request.match_info["namespace"] in self.forbidden_namespaces:
            return self.status(403, "Forbidden", "services.serving.knative.dev is forbidden")
        return None

    def _stamp(self, body: dict[str, Any]) -> dict[str, Any]:
        self._version += 1
        body["metadata"]["resourceVersion"] = str(self._version)
        return body

    async def _get(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        key = (request.match_info["namespace"], request.match_info["name"])
        if key not in self.objects:
            return self.status(
                404, "NotFound", f'services.serving.knative.dev "{key[1]}" not found'
            )
        return web.json_response(self.objects[key])

    async def _create(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        body = await request.json()
        key = (request.match_info["namespace"], body["metadata"]["name"])
        if key in self.objects:
            return self.status(409, "AlreadyExists", "already exists")
        self.objects[key] = self._stamp(body)
        return web.json_response(body, status=201)

    async def _replace(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        body = await request.json()
        key = (request.match_info["namespace"], request.match_info["name"])
        current = self.objects.get(key)
        if current is None:
            return self.status(404, "NotFound", "not found")
        if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            return self.status(409, "Conflict", "the object has been modified")
        self.objects[key] = self._stamp(body)
        return web.json_response(body)

    async def _delete(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        key = (request.match_info["namespace"], request.match_info["name"])
        if self.objects.pop(key, None) is None:
            return self.status(404, "NotFound", "not found")
        return self.status(200, "Success", "deleted")


@pytest.fixture
async def kubernetes(tmp_path: Path) -> AsyncIterator[tuple[KubernetesApiStandIn, Path]]:
    api = KubernetesApiStandIn()
    runner = web.AppRunner(api.app(), access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    api.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": {"server": api.url}}],
                "users": [{"name": "me", "user": {"token": TOKEN}}],
                "contexts": [{"name": "test", "context": {"cluster": "local", "user": "me"}}],
                "current-context": "test",
            }
        )
    )
    try:
        yield api, kubeconfig
    finally:
        await runner.cleanup()


async def test_apply_creates_leaves_then_replaces_and_remove_deletes(
    kubernetes: tuple[KubernetesApiStandIn, Path], tmp_path: Path
) -> None:
    api, kubeconfig = kubernetes
    cluster = {"kubeconfig": str(kubeconfig), "context": "test"}
    deployer = KnativeDeployer(tmp_path / "infra")
    plugin, target = one(FULL_DEPLOY | {"cluster": cluster})
    resource = "services.serving.knative.dev/ledger in namespace plugins"
    planned = await deployer.plan(plugin, target)
    assert planned.steps[1] == Step("apply", resource, "context test")
    assert api.requests == []  # a plan never contacts the cluster
    seen: list[Step] = []
    first = await deployer.apply(plugin, target, seen.append)
    assert [step.render() for step in seen] == [
        f"write {tmp_path / 'infra' / 'plugins' / 'ledger.yaml'}",
        f"create {resource} (context test)",
    ]
    assert first.steps == tuple(seen)
    second = await deployer.apply(plugin, target)
    assert not second.changes  # the cluster holds what was rendered: nothing to do
    stored = api.objects[("plugins", "ledger")]
    assert stored["spec"] == render_service(plugin, target)["spec"]
    assert stored["metadata"]["resourceVersion"] == "1"
    newer = dict(plugin_entry(FULL_DEPLOY | {"cluster": cluster}), version="1.3.0")
    plugin, target = manifest(newer).plugins[0], manifest(newer).plugins[0].target
    third = await deployer.apply(plugin, target)
    assert [step.action for step in third.steps] == ["write", "replace"]
    stored = api.objects[("plugins", "ledger")]
    assert stored["spec"]["template"]["metadata"]["name"] == "ledger-1-3-0"
    assert stored["metadata"]["resourceVersion"] == "2"
    removed = await deployer.remove(plugin, target)
    assert [step.action for step in removed.steps] == ["delete", "delete"]
    assert api.objects == {}
    again = await deployer.remove(plugin, target)
    assert [(step.action, step.detail) for step in again.steps] == [
        ("unchanged", "absent"),
        ("unchanged", "absent"),
    ]


async def test_apply_maps_api_refusals(
    kubernetes: tuple[KubernetesApiStandIn, Path], tmp_path: Path
) -> None:
    api, kubeconfig = kubernetes
    deployer = KnativeDeployer(tmp_path / "infra")
    cluster = {"kubeconfig": str(kubeconfig)}
    plugin, target = one({"image": "x", "cluster": cluster}, namespace="kube-system")
    with pytest.raises(Forbidden, match="not allowed to write"):
        await deployer.apply(plugin, target)
    with pytest.raises(Forbidden, match="not allowed to delete"):
        await deployer.remove(plugin, target)
    assert api.objects == {}


def test_cli_deploy_dry_run_prints_yaml_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest_file = tmp_path / "plugins.yaml"
    local = {"id": "local", "version": "1.0.0", "target": {"provider": "local",
             "entrypoint": "echo_plugin:EchoPlugin", "path": str(ROOT / "examples" / "python")},
             "methods": {"say": {}}}  # fmt: skip
    document = {"version": 1, "plugins": [plugin_entry(FULL_DEPLOY), local]}
    manifest_file.write_bytes(orjson.dumps(document))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["-m", str(manifest_file), "deploy", "--dry-run"])
    assert result.exit_code == 0, result.output
    planned, _, rest = result.output.partition("apiVersion:")
    assert planned.splitlines()[:2] == [
        "ledger@1.2.0: knative service plugins/ledger",
        f"  write {tmp_path}/infra/knative/plugins/ledger.yaml (render only: no deploy.cluster)",
    ]
    document = yaml.safe_load("apiVersion:" + rest.split("local@1.0.0")[0])
    assert document["kind"] == "Service"
    assert "local@1.0.0: local echo_plugin:EchoPlugin: nothing to deploy" in result.output
    assert not (tmp_path / "infra").exists()
    written = CliRunner().invoke(main, ["-m", str(manifest_file), "deploy", "ledger"])
    assert written.exit_code == 0, written.output
    assert "ledger@1.2.0: deployed knative service plugins/ledger" in written.output
    assert (tmp_path / "infra" / "knative" / "plugins" / "ledger.yaml").exists()
    again = CliRunner().invoke(main, ["-m", str(manifest_file), "deploy", "ledger"])
    assert "ledger@1.2.0: knative service plugins/ledger: up to date" in again.output


def test_cli_deploy_names_the_plugin_once_in_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest_file = tmp_path / "plugins.yaml"
    entry = plugin_entry(FULL_DEPLOY)
    del entry["target"]["deploy"]
    manifest_file.write_bytes(orjson.dumps({"version": 1, "plugins": [entry]}))
    monkeypatch.chdir(tmp_path)
    for options in ([], ["--dry-run"]):
        result = CliRunner().invoke(main, ["-m", str(manifest_file), "deploy", *options])
        assert result.exit_code == 1, result.output
        assert result.output.count("ledger@1.2.0") == 1, result.output
        assert "has no 'deploy' section to render" in result.output
    assert not (tmp_path / "infra").exists()
    removed = CliRunner().invoke(main, ["-m", str(manifest_file), "deploy", "--remove", "ledger"])
    assert removed.exit_code == 0, removed.output
    assert not (tmp_path / "infra" / "knative" / "plugins" / "ledger.yaml").exists()
