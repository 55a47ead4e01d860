"""``dispatcher deploy``: package a Python plugin and make it a Lambda function behind an alias.

The steps, each reported as it ends (``Step``):

1. **package** — a zip of the plugin's folder, a generated ``linchkit_handler.py``
   (``handler = lambda_handler(Plugin)``), the ``dispatcher`` SDK and the installed files of
   every distribution it needs (and the target's ``requirements``), taken from the running
   environment: offline, and the same wheels the tests ran against. The zip is
   byte-for-byte reproducible (sorted entries, fixed timestamps), so its ``CodeSha256``
   changes only when the code does: that is what makes a second deploy a no-op.
2. **function** — create the function, or update its code and/or configuration where they
   differ from what is deployed;
3. **active** — wait until it is ``Active`` and its last update ``Successful``;
4. **version** — publish a version, unless the newest version already has this code and
   configuration;
5. **alias** — create the alias or move it to that version.

The Lambda API calls live in the provider (``providers/aws_lambda.py``, the one module
that knows aiobotocore); this module decides what to do and packages the code.
``infra/lambda/`` holds the same function as CloudFormation and the IAM policy the
deploying identity needs; ``tests/test_lambda_deploy.py`` checks the three agree.

Vendoring from the running environment assumes it matches Lambda's: Linux x86_64,
CPython 3.11 (``runtime: python3.11``); deploy refuses to package from anything else.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import io
import platform
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from linchkit_plugin.aws_lambda import CONFIG_ENVIRONMENT_VARIABLE
from linchkit_plugin.errors import ProviderError

if TYPE_CHECKING:
    from dispatcher.config import Manifest, PluginSpec
    from providers.aws_lambda import LambdaDeploySettings, LambdaProvider, LambdaTarget

__all__ = [
    "HANDLER",
    "Deployment",
    "FunctionSpec",
    "Package",
    "Step",
    "build_package",
    "deploy_plugin",
    "deploy_targets",
    "function_spec",
]

HANDLER = "linchkit_handler.handler"
SDK_DISTRIBUTION = "linchkit-dispatcher"
# Packages of this repository that the SDK imports (``import dispatcher`` loads both).
SDK_PACKAGES = ("dispatcher", "providers")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_SKIPPED_PARTS = frozenset({"__pycache__", ".pytest_cache", ".mypy_cache", ".git"})

Progress = Callable[["Step"], None]


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a deploy: what it did (or, with ``--dry-run``, would do)."""

    name: str
    action: str  # created, updated, unchanged, published, moved, waited, built, would …
    detail: str = ""

    @property
    def changed(self) -> bool:
        return self.action not in ("unchanged", "built", "waited")

    def render(self) -> str:
        return f"{self.name:<9} {self.action:<16} {self.detail}".rstrip()


@dataclass(frozen=True, slots=True)
class Package:
    """The function's code: a reproducible zip and its Lambda-style hash."""

    zip_bytes: bytes
    files: int

    @property
    def code_sha256(self) -> str:
        """``CodeSha256`` as Lambda reports it: base64 of the SHA-256 of the zip."""
        return base64.b64encode(hashlib.sha256(self.zip_bytes).digest()).decode("ascii")


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """The function's configuration, as ``CreateFunction`` takes it."""

    name: str
    role: str
    handler: str
    runtime: str
    memory_mb: int
    timeout_s: int
    architecture: str
    environment: dict[str, str] = field(default_factory=dict)
    description: str = ""
    alias: str = "live"

    def configuration(self) -> dict[str, Any]:
        """The keyword arguments shared by CreateFunction and UpdateFunctionConfiguration."""
        return {
            "Role": self.role,
            "Handler": self.handler,
            "Runtime": self.runtime,
            "MemorySize": self.memory_mb,
            "Timeout": self.timeout_s,
            "Environment": {"Variables": dict(self.environment)},
            "Description": self.description,
        }

    def differences(self, deployed: dict[str, Any]) -> list[str]:
        """Names of the settings whose deployed value differs from this spec."""
        wanted = self.configuration()
        changed = [
            key
            for key in ("Role", "Handler", "Runtime", "MemorySize", "Timeout", "Description")
            if deployed.get(key, "" if key == "Description" else None) != wanted[key]
        ]
        variables = (deployed.get("Environment") or {}).get("Variables") or {}
        if variables != wanted["Environment"]["Variables"]:
            changed.append("Environment")
        return changed


def function_spec(plugin: PluginSpec[Any], target: LambdaTarget) -> FunctionSpec:
    """The configuration ``deploy`` gives the function behind ``target``."""
    settings = _settings(plugin, target)
    environment = dict(settings.environment)
    if plugin.config:
        environment[CONFIG_ENVIRONMENT_VARIABLE] = orjson.dumps(
            plugin.config, option=orjson.OPT_SORT_KEYS
        ).decode()
    return FunctionSpec(
        name=target.function_name,
        role=settings.role,
        handler=HANDLER,
        runtime=settings.runtime,
        memory_mb=settings.memory_mb,
        timeout_s=settings.timeout_s,
        architecture=settings.architecture,
        environment=environment,
        description=f"LinchKit plugin {plugin.key}",
        alias=settings.alias,
    )


def build_package(plugin: PluginSpec[Any], target: LambdaTarget) -> Package:
    """The reproducible zip for ``plugin`` (see the module docstring)."""
    settings = _settings(plugin, target)
    _check_platform(settings.runtime)
    entries: dict[str, bytes] = {}
    module, _, attribute = settings.entrypoint.partition(":")
    for name, content in _plugin_files(module, settings.path):
        entries[name] = content
    for package in SDK_PACKAGES:
        for name, content in _package_files(package):
            entries.setdefault(name, content)
    for distribution in _closure([SDK_DISTRIBUTION, *settings.requirements]):
        for name, content in _distribution_files(distribution):
            entries.setdefault(name, content)
    entries[HANDLER.partition(".")[0] + ".py"] = _handler_source(module, attribute)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, _FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, entries[name])
    return Package(buffer.getvalue(), len(entries))


async def deploy_plugin(
    provider: LambdaProvider,
    plugin: PluginSpec[Any],
    target: LambdaTarget,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> list[Step]:
    """Package ``plugin`` and make the function behind ``target`` run it; idempotent."""
    steps: list[Step] = []

    def report(step: Step) -> None:
        steps.append(step)
        if progress is not None:
            progress(step)

    package = build_package(plugin, target)
    report(
        Step(
            "package",
            "built",
            f"{len(package.zip_bytes) / 1e6:.1f} MB, {package.files} files, "
            f"sha256 {package.code_sha256[:12]}…",
        )
    )
    spec = function_spec(plugin, target)
    await provider.apply_function(target, spec, package, dry_run=dry_run, report=report)
    return steps


def _settings(plugin: PluginSpec[Any], target: LambdaTarget) -> LambdaDeploySettings:
    if target.deploy is None:
        raise ProviderError(
            f"{plugin.key}: the lambda target {target.function_name} has no 'deploy' settings "
            "(role, entrypoint, path); add them to deploy it"
        )
    return target.deploy


def _check_platform(runtime: str) -> None:
    wanted = runtime.removeprefix("python")
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if running != wanted or sys.platform != "linux" or platform.machine() != "x86_64":
        raise ProviderError(
            f"deploy vendors the running environment's packages, so it must run on Linux "
            f"x86_64 with Python {wanted} for runtime {runtime}; this is {sys.platform} "
            f"{platform.machine()} Python {running}"
        )


def _handler_source(module: str, attribute: str) -> bytes:
    return (
        '"""Generated by `dispatcher deploy`: the Lambda entry point of this plugin."""\n\n'
        "from linchkit_plugin.aws_lambda import lambda_handler\n"
        f"from {module} import {attribute}\n\n"
        f"handler = lambda_handler({attribute})\n"
    ).encode()


def _walk(folder: Path, prefix: str = "") -> Iterator[tuple[str, bytes]]:
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if _SKIPPED_PARTS.intersection(relative.parts) or not path.is_file():
            continue
        if path.suffix in (".pyc", ".pyo"):
            continue
        yield prefix + relative.as_posix(), path.read_bytes()


def _plugin_files(module: str, path: Path | None) -> Iterator[tuple[str, bytes]]:
    if path is not None:
        if not path.is_dir():
            raise ProviderError(f"plugin path {path} is not a folder")
        yield from _walk(path)
        return
    top = module.partition(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        raise ProviderError(f"cannot find the plugin module {top!r}; set 'path' in deploy")
    origin = Path(spec.origin)
    if origin.name == "__init__.py":
        yield from _walk(origin.parent, f"{top}/")
    else:
        yield origin.name, origin.read_bytes()


def _package_files(package: str) -> Iterator[tuple[str, bytes]]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ProviderError(f"cannot find the package {package!r} to vendor")
    yield from _walk(Path(next(iter(spec.submodule_search_locations))), f"{package}/")


def _closure(names: Iterable[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``names`` need at run time (no extras), recursively."""
    from packaging.requirements import Requirement

    found: dict[str, importlib.metadata.Distribution] = {}
    stack = list(names)
    while stack:
        name = stack.pop()
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise ProviderError(
                f"{name!r} is not installed here; deploy vendors installed packages"
            ) from None
        key = distribution.metadata["Name"].lower().replace("_", "-")
        if key in found:
            continue
        found[key] = distribution
        for requirement in distribution.requires or []:
            parsed = Requirement(requirement)
            if parsed.marker is None or parsed.marker.evaluate({"extra": ""}):
                stack.append(parsed.name)
    return [found[key] for key in sorted(found)]


def _distribution_files(
    distribution: importlib.metadata.Distribution,
) -> Iterator[tuple[str, bytes]]:
    for file in distribution.files or []:
        name = file.as_posix()
        if name.startswith("..") or name.endswith((".pyc", ".pyo")) or "__pycache__" in name:
            continue  # scripts installed into bin/, and bytecode
        if name.endswith(("/RECORD", "/INSTALLER", "/direct_url.json")) or name.endswith(".pth"):
            continue
        path = Path(str(distribution.locate_file(file)))
        if path.is_file():
            yield name, path.read_bytes()


@dataclass(frozen=True, slots=True)
class Deployment:
    """What ``deploy_targets`` did for one plugin's target."""

    plugin: str
    target: str
    steps: list[Step]

    @property
    def changed(self) -> bool:
        return any(step.changed for step in self.steps)


async def deploy_targets(
    manifest: Manifest[Any],
    *,
    only: Iterable[str] = (),
    dry_run: bool = False,
    on_target: Callable[[str, str], None] | None = None,
    progress: Progress | None = None,
) -> list[Deployment]:
    """Deploy every Lambda target (with ``deploy`` settings) of ``manifest``, or of ``only``."""
    from providers.aws_lambda import LambdaProvider, LambdaTarget

    wanted = set(only)
    known = {plugin.id for plugin in manifest.plugins} | {p.key for p in manifest.plugins}
    unknown = wanted - known
    if unknown:
        raise ProviderError(f"no plugin {', '.join(sorted(unknown))} in the manifest")
    deployments: list[Deployment] = []
    async with LambdaProvider() as provider:
        for plugin in manifest.plugins:
            if wanted and plugin.id not in wanted and plugin.key not in wanted:
                continue
            for target in plugin.targets():
                if not isinstance(target, LambdaTarget) or target.deploy is None:
                    continue
                if on_target is not None:
                    on_target(plugin.key, target.describe())
                steps = await deploy_plugin(
                    provider, plugin, target, dry_run=dry_run, progress=progress
                )
                deployments.append(Deployment(plugin.key, target.describe(), steps))
    return deployments
