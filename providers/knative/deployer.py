"""``dispatcher deploy`` for knative targets: the typed deploy seam (``providers.deploy``).

* ``plan`` renders and validates the Service and answers it as ``Plan.document``, with the
  steps ``apply`` would take; it writes nothing and never contacts the cluster (a dry run
  works without credentials), so its cluster step says ``apply`` rather than create or
  replace.
* ``apply`` writes the Service into ``infra_dir/{namespace}/{service}.yaml`` (``infra_dir``
  is ``infra/knative`` under the working directory unless the provider is given another;
  the steps name the absolute path) (``unchanged``
  when the file already says the same) and, when ``deploy.cluster`` is set, creates or
  replaces it through the Kubernetes API (``unchanged`` when the cluster already holds
  it); each step goes to ``progress`` as it ends.
* ``remove`` deletes the Service from the cluster (when ``deploy.cluster`` is set) and the
  written file; what is already absent is ``unchanged``, not an error.
"""

from __future__ import annotations

from pathlib import Path

from linchkit_plugin.errors import ProviderError
from providers.deploy import Deployer, Plan, Progress, Step
from providers.knative import service
from providers.knative.target import KnativeDeploy, KnativeTarget
from providers.target import PluginInfo

__all__ = ["KnativeDeployer"]


class KnativeDeployer(Deployer[KnativeTarget]):
    """Renders knative targets into ``infra_dir`` and applies them where a cluster is set."""

    def __init__(self, infra_dir: str | Path = "infra/knative") -> None:
        self.infra_dir = Path(infra_dir)

    def path(self, target: KnativeTarget) -> Path:
        """Where ``apply`` writes the Service of ``target``: absolute, so every step says
        where the file is (``infra_dir`` is taken from the working directory)."""
        return (self.infra_dir / target.namespace / f"{target.service}.yaml").absolute()

    async def plan(self, plugin: PluginInfo, target: KnativeTarget) -> Plan:
        document = service.render_yaml(plugin, target)
        spec = _deploy_of(plugin, target)
        path = self.path(target)
        written = path.is_file() and path.read_text(encoding="utf-8") == document
        steps = [Step("unchanged" if written else "write", str(path), _render_only(spec))]
        if spec.cluster is not None:
            steps.append(Step("apply", service.resource_name(target), _where(spec)))
        return Plan(_name(target), tuple(steps), document)

    async def apply(
        self, plugin: PluginInfo, target: KnativeTarget, progress: Progress | None = None
    ) -> Plan:
        document = service.render_yaml(plugin, target)
        spec = _deploy_of(plugin, target)
        path = self.path(target)
        steps: list[Step] = []
        if path.is_file() and path.read_text(encoding="utf-8") == document:
            _report(steps, progress, Step("unchanged", str(path), _render_only(spec)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(document, encoding="utf-8")
            _report(steps, progress, Step("write", str(path), _render_only(spec)))
        if spec.cluster is not None:
            action = await service.apply(service.render_service(plugin, target), spec.cluster)
            _report(steps, progress, Step(action, service.resource_name(target), _where(spec)))
        return Plan(_name(target), tuple(steps), document)

    async def remove(
        self, plugin: PluginInfo, target: KnativeTarget, progress: Progress | None = None
    ) -> Plan:
        steps: list[Step] = []
        resource = service.resource_name(target)
        cluster = target.deploy.cluster if target.deploy is not None else None
        if cluster is not None:
            deleted = await service.delete(target.service, target.namespace, cluster)
            detail = "" if deleted else "absent"
            _report(steps, progress, Step("delete" if deleted else "unchanged", resource, detail))
        path = self.path(target)
        if path.is_file():
            path.unlink()
            _report(steps, progress, Step("delete", str(path)))
        else:
            _report(steps, progress, Step("unchanged", str(path), "absent"))
        return Plan(_name(target), tuple(steps))


def _deploy_of(plugin: PluginInfo, target: KnativeTarget) -> KnativeDeploy:
    if target.deploy is None:  # render_yaml refuses it first; here for the type checker
        raise ProviderError(f"knative target {target.service} of {plugin.id} has no 'deploy'")
    return target.deploy


def _name(target: KnativeTarget) -> str:
    return f"knative service {target.namespace}/{target.service}"


def _render_only(spec: KnativeDeploy) -> str:
    return "render only: no deploy.cluster" if spec.cluster is None else ""


def _where(spec: KnativeDeploy) -> str:
    cluster = spec.cluster
    if cluster is None:
        return ""
    return f"context {cluster.context}" if cluster.context else "the kubeconfig's current context"


def _report(steps: list[Step], progress: Progress | None, step: Step) -> None:
    steps.append(step)
    if progress is not None:
        progress(step)
