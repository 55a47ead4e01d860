"""``dispatcher deploy`` for Lambda: the plugin's zip as a function version behind an alias.

``apply`` takes these steps, each reported to ``progress`` as it ends:

1. **function** — create it (then wait until it is ``Active``), or else
   **code** and **configuration** — update each where it differs from what is deployed
   (``CodeSha256`` of the reproducible zip, the settings of ``FunctionSpec``);
2. **version** — publish one, unless the newest version already has this code and
   configuration;
3. **alias** — create the alias or move it to that version.

``package`` writes the zip alone (``--package-only``), for SAM or a pipeline to deploy.
``plan`` reads the same live state and answers the same steps without writing anything
(``--dry-run``), with the function's configuration as the plan's document. ``remove``
deletes the alias, then the function with all its versions. The package (what goes in
the zip) is ``package.py``; ``infra/lambda/deploy-policy.json`` lists exactly the Lambda
actions these call (``tests/test_lambda_deploy.py`` checks).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from linchkit_plugin.errors import DispatchError, ProviderError, TargetUnavailable
from providers.aws_lambda.client import LambdaClients, aws_error_code
from providers.aws_lambda.errors import translate
from providers.aws_lambda.package import (
    FunctionSpec,
    Package,
    build_package,
    describe_function,
    function_spec,
    settings_of,
    write_package,
)
from providers.aws_lambda.target import LambdaTarget
from providers.deploy import Deployer, Plan, Progress, Step
from providers.target import PluginInfo

__all__ = ["LambdaDeployer"]


class LambdaDeployer(Deployer[LambdaTarget]):
    """Deploys through the provider's clients: use it while the provider is started."""

    def __init__(self, clients: LambdaClients, *, wait_timeout: float = 300.0) -> None:
        self._clients = clients
        self._wait_timeout = wait_timeout

    async def plan(self, plugin: PluginInfo, target: LambdaTarget) -> Plan:
        spec = function_spec(plugin, target)
        package = build_package(plugin, target)
        steps = await self._guarded(target, self._deploy(target, spec, package, None, True))
        return Plan(target.describe(), steps, document=describe_function(spec, package))

    async def apply(
        self, plugin: PluginInfo, target: LambdaTarget, progress: Progress | None = None
    ) -> Plan:
        spec = function_spec(plugin, target)
        package = build_package(plugin, target)
        steps = await self._guarded(target, self._deploy(target, spec, package, progress, False))
        return Plan(target.describe(), steps)

    async def package(self, plugin: PluginInfo, target: LambdaTarget, out_dir: Path) -> Path:
        """The zip ``apply`` uploads, as ``out_dir/<function name>.zip`` (what the SAM
        template's ``CodeUri`` names); byte for byte the same, so its hash is the
        ``CodeSha256`` a deploy of it reports. Written whole or not at all."""
        package = build_package(plugin, target)
        return await asyncio.to_thread(write_package, package, out_dir, target.function_name)

    async def remove(
        self, plugin: PluginInfo, target: LambdaTarget, progress: Progress | None = None
    ) -> Plan:
        alias = settings_of(plugin, target).alias
        steps = await self._guarded(target, self._remove(target, alias, progress))
        return Plan(target.describe(), steps)

    # -- the steps -----------------------------------------------------------------------

    async def _deploy(
        self,
        target: LambdaTarget,
        spec: FunctionSpec,
        package: Package,
        progress: Progress | None,
        dry_run: bool,
    ) -> tuple[Step, ...]:
        report = _Reporter(progress)
        client = await self._clients.get(target, control_plane=True)
        name = spec.name
        deployed = await _configuration(client, name)
        if deployed is None:
            if not dry_run:
                await client.create_function(
                    FunctionName=name,
                    Code={"ZipFile": package.zip_bytes},
                    PackageType="Zip",
                    Architectures=[spec.architecture],
                    Publish=False,
                    **spec.configuration(),
                )
                await self._wait_active(client, name)
            report("create", f"function {name}", f"{spec.runtime}, {package.describe()}")
            if dry_run:
                report("publish", f"version {name}", "1")
                report("create", f"alias {name}:{spec.alias}", "→ 1")
                return report.steps
        else:
            await self._update(client, spec, package, deployed, report, dry_run)
        version = await self._publish(client, spec, package, report, dry_run)
        await self._move_alias(client, spec, version, report, dry_run)
        return report.steps

    async def _update(
        self,
        client: Any,
        spec: FunctionSpec,
        package: Package,
        deployed: dict[str, Any],
        report: _Reporter,
        dry_run: bool,
    ) -> None:
        name = spec.name
        if deployed.get("CodeSha256") != package.code_sha256:
            if not dry_run:
                await self._wait_active(client, name)
                await client.update_function_code(
                    FunctionName=name, ZipFile=package.zip_bytes, Publish=False
                )
            old = str(deployed.get("CodeSha256", ""))[:12]
            detail = f"sha256 {old}… → {package.code_sha256[:12]}…, {package.describe()}"
            report("update", f"code {name}", detail)
        else:
            report("unchanged", f"code {name}", f"sha256 {package.code_sha256[:12]}…")
        changed = spec.differences(deployed)
        if changed and not dry_run:
            await self._wait_active(client, name)
            await client.update_function_configuration(FunctionName=name, **spec.configuration())
        report("update" if changed else "unchanged", f"configuration {name}", ", ".join(changed))

    async def _publish(
        self,
        client: Any,
        spec: FunctionSpec,
        package: Package,
        report: _Reporter,
        dry_run: bool,
    ) -> str:
        newest: dict[str, Any] | None = None
        for candidate in await _versions(client, spec.name):
            if newest is None or int(candidate["Version"]) > int(newest["Version"]):
                newest = candidate
        resource = f"version {spec.name}"
        if (
            newest is not None
            and newest.get("CodeSha256") == package.code_sha256
            and not spec.differences(newest)
        ):
            report("unchanged", resource, f"{newest['Version']} has this code and configuration")
            return str(newest["Version"])
        if dry_run:
            report("publish", resource, "the next")
            return "(new)"
        await self._wait_active(client, spec.name)
        published = await client.publish_version(
            FunctionName=spec.name, CodeSha256=package.code_sha256, Description=spec.description
        )
        version = str(published["Version"])
        report("publish", resource, version)
        return version

    async def _move_alias(
        self, client: Any, spec: FunctionSpec, version: str, report: _Reporter, dry_run: bool
    ) -> None:
        resource = f"alias {spec.name}:{spec.alias}"
        alias = await _alias(client, spec.name, spec.alias)
        if alias is None:
            if not dry_run:
                await client.create_alias(
                    FunctionName=spec.name, Name=spec.alias, FunctionVersion=version
                )
            report("create", resource, f"→ {version}")
        elif alias.get("FunctionVersion") != version:
            if not dry_run:
                await client.update_alias(
                    FunctionName=spec.name, Name=spec.alias, FunctionVersion=version
                )
            report("move", resource, f"{alias['FunctionVersion']} → {version}")
        else:
            report("unchanged", resource, f"→ {version}")

    async def _remove(
        self, target: LambdaTarget, alias: str, progress: Progress | None
    ) -> tuple[Step, ...]:
        report = _Reporter(progress)
        client = await self._clients.get(target, control_plane=True)
        name = target.function_name
        if await _configuration(client, name) is None:
            return report.steps
        if await _alias(client, name, alias) is not None:
            await client.delete_alias(FunctionName=name, Name=alias)
            report("delete", f"alias {name}:{alias}")
        versions = [str(version["Version"]) for version in await _versions(client, name)]
        await client.delete_function(FunctionName=name)
        report("delete", f"function {name}", f"versions {', '.join(versions) or '-'}")
        return report.steps

    # -- helpers -------------------------------------------------------------------------

    async def _guarded(
        self, target: LambdaTarget, work: Awaitable[tuple[Step, ...]]
    ) -> tuple[Step, ...]:
        try:
            return await work
        except DispatchError:
            raise
        except Exception as error:
            raise translate(error, target) from error

    async def _wait_active(self, client: Any, name: str) -> None:
        started = time.monotonic()
        delay = 0.05
        while True:
            configuration = await client.get_function_configuration(FunctionName=name)
            state = configuration.get("State", "Active")
            update = configuration.get("LastUpdateStatus", "Successful")
            if state == "Failed" or update == "Failed":
                reason = configuration.get("StateReason") or configuration.get(
                    "LastUpdateStatusReason"
                )
                raise ProviderError(f"function {name} failed to become active: {reason}")
            if state == "Active" and update != "InProgress":
                return
            if time.monotonic() - started > self._wait_timeout:
                raise TargetUnavailable(
                    f"function {name} is still {state}/{update} after {self._wait_timeout:.0f} s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class _Reporter:
    """Collects a deploy's steps and hands each to ``progress`` as it ends."""

    def __init__(self, progress: Progress | None) -> None:
        self.steps: tuple[Step, ...] = ()
        self._progress: Callable[[Step], None] | None = progress

    def __call__(self, action: str, resource: str, detail: str = "") -> None:
        step = Step(action, resource, detail)
        self.steps += (step,)
        if self._progress is not None:
            self._progress(step)


async def _configuration(client: Any, name: str) -> dict[str, Any] | None:
    """The deployed function's configuration, None if there is no such function."""
    try:
        answer = await client.get_function_configuration(FunctionName=name)
    except Exception as error:
        if aws_error_code(error) == "ResourceNotFoundException":
            return None
        raise
    return dict(answer)


async def _alias(client: Any, name: str, alias: str) -> dict[str, Any] | None:
    try:
        return dict(await client.get_alias(FunctionName=name, Name=alias))
    except Exception as error:
        if aws_error_code(error) == "ResourceNotFoundException":
            return None
        raise


async def _versions(client: Any, name: str) -> list[dict[str, Any]]:
    """The function's published versions (``$LATEST`` aside)."""
    found: list[dict[str, Any]] = []
    paginator = client.get_paginator("list_versions_by_function")
    async for page in paginator.paginate(FunctionName=name):
        found += [v for v in page.get("Versions", []) if v.get("Version") != "$LATEST"]
    return found
