"""Knative Services: render one from a plugin and its target, validate it, and write it
through the Kubernetes API.

``render_service`` turns a plugin and its knative target into one ``serving.knative.dev/v1``
Service (https://knative.dev/docs/serving/reference/serving-api/):

* the revision is named ``{service}-{version}`` (the plugin version, made a DNS label), so a
  canary can pin the stable revision by plugin version; change the version to change the
  template, as Knative refuses a new template under an existing revision name;
* ``autoscaling.knative.dev/min-scale``/``max-scale`` annotations bound the scale
  (https://knative.dev/docs/serving/autoscaling/scale-bounds/);
* ``containerConcurrency`` and ``timeoutSeconds`` on the revision; the plugin's ``config``
  travels in ``LINCHKIT_PLUGIN_CONFIG`` (read by ``python -m linchkit_plugin.knative``);
* traffic: all to the latest revision, or with ``canary`` a split between the stable
  revision (tag ``stable``) and the latest (tag ``canary.tag``), each reachable on its tag
  host.

Every rendered Service is checked against the CRD's OpenAPI schema kept beside this module
in ``schemas/`` (where it came from is written in the file) and against the rules Knative's
admission webhook adds. ``apply`` creates the Service, replaces it at its current
``resourceVersion``, or leaves it when the cluster already holds what was rendered;
``delete`` removes it. Both go through the Kubernetes API with kubernetes-asyncio, from the
user's kubeconfig; its failures become dispatcher errors here.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml

from linchkit_plugin.errors import (
    DispatchError,
    Forbidden,
    InvalidParams,
    ProviderError,
    TargetUnavailable,
    Unauthorized,
)
from providers.knative.target import KnativeCluster, KnativeTarget
from providers.target import PluginInfo

__all__ = [
    "apply",
    "delete",
    "render_service",
    "render_yaml",
    "resource_name",
    "revision_name",
    "validate_service",
]

GROUP = "serving.knative.dev"
VERSION = "v1"
PLURAL = "services"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "knative-serving-v1-service.openapi.json"
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?\Z")


def revision_name(service: str, version: str) -> str:
    suffix = re.sub(r"[^a-z0-9]+", "-", version.lower()).strip("-")
    return f"{service}-{suffix}"[:63].rstrip("-")


def render_service(plugin: PluginInfo, target: KnativeTarget) -> dict[str, Any]:
    """The Service manifest for ``plugin`` on ``target`` (which must have ``deploy``)."""
    spec = target.deploy
    if spec is None:
        raise ProviderError(
            f"knative target {target.service} of {plugin.id} has no 'deploy' section to render "
            "(add deploy: {image: ...} to the target)"
        )
    labels = {
        "app.kubernetes.io/name": plugin.id,
        "app.kubernetes.io/version": re.sub(r"[^A-Za-z0-9_.-]", "_", plugin.version)[:63],
        "app.kubernetes.io/managed-by": "linchkit-dispatcher",
    }
    annotations = {"autoscaling.knative.dev/min-scale": str(spec.min_scale)}
    if spec.max_scale is not None:
        annotations["autoscaling.knative.dev/max-scale"] = str(spec.max_scale)
    env = [{"name": name, "value": value} for name, value in spec.env.items()]
    env.append({"name": "LINCHKIT_PLUGIN_CONFIG", "value": orjson.dumps(plugin.config).decode()})
    container: dict[str, Any] = {"name": "plugin", "image": spec.image}
    if spec.args:
        container["args"] = list(spec.args)
    container["env"] = env
    if spec.port is not None:
        container["ports"] = [{"containerPort": spec.port}]
    container["readinessProbe"] = {"httpGet": {"path": target.effective_readiness_path}}
    resources = {
        key: dict(value)
        for key, value in (("requests", spec.requests), ("limits", spec.limits))
        if value
    }
    if resources:
        container["resources"] = resources
    revision_spec: dict[str, Any] = {"containerConcurrency": spec.container_concurrency}
    if spec.timeout_seconds is not None:
        revision_spec["timeoutSeconds"] = spec.timeout_seconds
    revision_spec["containers"] = [container]
    if spec.canary is None:
        traffic: list[dict[str, Any]] = [{"latestRevision": True, "percent": 100}]
    else:
        traffic = [
            {
                "revisionName": revision_name(target.service, spec.canary.stable_version),
                "latestRevision": False,
                "percent": 100 - spec.canary.percent,
                "tag": "stable",
            },
            {"latestRevision": True, "percent": spec.canary.percent, "tag": spec.canary.tag},
        ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Service",
        "metadata": {"name": target.service, "namespace": target.namespace, "labels": labels},
        "spec": {
            "template": {
                "metadata": {
                    "name": revision_name(target.service, plugin.version),
                    "labels": dict(labels),  # a copy: YAML would print an anchor
                    "annotations": annotations,
                },
                "spec": revision_spec,
            },
            "traffic": traffic,
        },
    }


def render_yaml(plugin: PluginInfo, target: KnativeTarget) -> str:
    service = render_service(plugin, target)
    validate_service(service)
    return yaml.safe_dump(service, sort_keys=False)


@cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    structural = orjson.loads(SCHEMA_PATH.read_bytes())
    return Draft202012Validator(_as_json_schema(structural))


def _as_json_schema(node: Any) -> Any:
    """The CRD's structural schema as JSON Schema, with Kubernetes' unknown-field rule.

    The API server prunes (and with strict field validation rejects) fields a structural
    schema does not declare, unless the object is marked
    ``x-kubernetes-preserve-unknown-fields``; here such fields are errors, so a typo in a
    rendered manifest fails the test instead of being dropped silently by the cluster.
    """
    if isinstance(node, list):
        return [_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {
        key: (
            {name: _as_json_schema(child) for name, child in value.items()}
            if key == "properties"
            else _as_json_schema(value)
        )
        for key, value in node.items()
        if not key.startswith("x-") and key != "$comment"
    }
    open_object = (
        node.get("x-kubernetes-preserve-unknown-fields")
        or node.get("x-linchkit-elided")
        or "additionalProperties" in node
        or "properties" not in node
    )
    if node.get("type") == "object" and not open_object:
        converted["additionalProperties"] = False
    return converted


def validate_service(service: dict[str, Any]) -> None:
    """Raise ``InvalidParams`` listing what the CRD schema or Knative's webhook would refuse."""
    problems = [
        f"{'.'.join(str(part) for part in error.absolute_path) or '<root>'}: {error.message}"
        for error in _validator().iter_errors(service)
    ]
    name = service.get("metadata", {}).get("name", "")
    if not _DNS_1035.match(name) or len(name) > 63:
        problems.append(f"metadata.name: {name!r} is not a DNS-1035 label")
    traffic = service.get("spec", {}).get("traffic", [])
    if traffic and sum(item.get("percent", 0) for item in traffic) != 100:
        problems.append("spec.traffic: percents must add up to 100")
    tags = [item["tag"] for item in traffic if "tag" in item]
    if len(tags) != len(set(tags)):
        problems.append("spec.traffic: tags must be unique")
    template = service.get("spec", {}).get("template", {})
    revision = template.get("metadata", {}).get("name")
    if revision is not None and not revision.startswith(f"{name}-"):
        problems.append(f"spec.template.metadata.name: {revision!r} must start with '{name}-'")
    annotations = template.get("metadata", {}).get("annotations", {})
    low = int(annotations.get("autoscaling.knative.dev/min-scale", "0"))
    high = int(annotations.get("autoscaling.knative.dev/max-scale", "0"))
    if high and low > high:
        problems.append("min-scale is above max-scale")
    if problems:
        raise InvalidParams(
            f"Knative Service {name!r} would be refused: " + "; ".join(problems),
            details={"problems": problems},
        )


def resource_name(target: KnativeTarget) -> str:
    """The Service as a deploy step names it."""
    return f"{PLURAL}.{GROUP}/{target.service} in namespace {target.namespace}"


async def apply(
    service: dict[str, Any], cluster: KnativeCluster
) -> Literal["create", "replace", "unchanged"]:
    """Create the Service, or replace it at its current resourceVersion; what was done.

    A Service the cluster already holds as rendered (every rendered field present with the
    same value; the webhook's defaults may add more) is left alone, so applying twice
    changes nothing.
    """
    metadata = service["metadata"]
    name, namespace = metadata["name"], metadata["namespace"]
    async with _custom_objects(cluster, f"write {PLURAL}.{GROUP}/{name} in {namespace}") as api:
        current = await _get(api, namespace, name)
        if current is None:
            await api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, service)
            return "create"
        held = {"spec": current.get("spec"), "labels": current["metadata"].get("labels")}
        if _contains(held, {"spec": service["spec"], "labels": metadata.get("labels")}):
            return "unchanged"
        version = current["metadata"]["resourceVersion"]
        replacement = {**service, "metadata": {**metadata, "resourceVersion": version}}
        await api.replace_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, replacement
        )
        return "replace"


async def delete(name: str, namespace: str, cluster: KnativeCluster) -> bool:
    """Delete the Service; False if there was none (not an error)."""
    from kubernetes_asyncio.client.exceptions import ApiException

    async with _custom_objects(cluster, f"delete {PLURAL}.{GROUP}/{name} in {namespace}") as api:
        try:
            await api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True


async def _get(api: Any, namespace: str, name: str) -> dict[str, Any] | None:
    from kubernetes_asyncio.client.exceptions import ApiException

    try:
        current: dict[str, Any] = await api.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return current


def _contains(held: Any, wanted: Any) -> bool:
    """Whether ``held`` has every field of ``wanted`` with the same value."""
    if isinstance(wanted, dict):
        return isinstance(held, dict) and all(
            key in held and _contains(held[key], value) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(held, list)
            and len(held) == len(wanted)
            and all(_contains(h, w) for h, w in zip(held, wanted, strict=True))
        )
    return bool(held == wanted)


@asynccontextmanager
async def _custom_objects(cluster: KnativeCluster, doing: str) -> AsyncIterator[Any]:
    """kubernetes-asyncio's CustomObjectsApi from the kubeconfig; its failures as ours."""
    try:
        from kubernetes_asyncio import client, config
        from kubernetes_asyncio.client.exceptions import ApiException
        from kubernetes_asyncio.config.config_exception import ConfigException
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise ProviderError(
            "applying Knative Services needs kubernetes-asyncio: pip install 'linchkit-dispatcher[knative]'"
        ) from None
    import aiohttp

    api_client = client.ApiClient(configuration=client.Configuration())
    try:
        await config.load_kube_config(
            config_file=str(cluster.kubeconfig) if cluster.kubeconfig is not None else None,
            context=cluster.context,
            client_configuration=api_client.configuration,
        )
        yield client.CustomObjectsApi(api_client)
    except ConfigException as error:
        raise ProviderError(f"cannot load the kubeconfig: {error}") from error
    except ApiException as error:
        raise _api_error(error, doing) from error
    except (aiohttp.ClientError, OSError, TimeoutError) as error:
        raise TargetUnavailable(f"cannot reach the Kubernetes API to {doing}: {error}") from error
    finally:
        await api_client.close()


def _api_error(error: Any, doing: str) -> DispatchError:
    status = getattr(error, "status", None)
    reason = _status_message(getattr(error, "body", None)) or getattr(error, "reason", "")
    if status == 401:
        return Unauthorized(f"the Kubernetes API refused the kubeconfig's credentials: {reason}")
    if status == 403:
        return Forbidden(f"not allowed to {doing}: {reason}")
    if status == 404:
        return ProviderError(
            f"the cluster has no {GROUP}/{VERSION} Services (is Knative Serving installed?): {reason}"
        )
    if status == 409:
        return TargetUnavailable(
            f"the Service changed while trying to {doing}; run again: {reason}"
        )
    if status in (400, 422):
        return InvalidParams(f"the cluster refused to {doing}: {reason}")
    if status in (429, 500, 502, 503, 504):
        return TargetUnavailable(f"the Kubernetes API failed to {doing} ({status}): {reason}")
    return ProviderError(f"the Kubernetes API answered {status} to {doing}: {reason}")


def _status_message(body: Any) -> str | None:
    try:
        decoded = orjson.loads(body) if body else None
    except (orjson.JSONDecodeError, TypeError):
        return None
    message = decoded.get("message") if isinstance(decoded, dict) else None
    return message if isinstance(message, str) else None
