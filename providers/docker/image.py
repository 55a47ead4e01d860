"""Deploying a docker target: building its image with the local engine, from ``build``.

Nothing is pulled or pushed: the engine here has no registry. A Python plugin is built
on the base image (``COPY . /plugin/`` and a ``CMD`` naming its class); anything else
brings its own Dockerfile (``FROM scratch`` plus a static binary for Go and Rust).

``plan`` compares a digest of the build's inputs (the context's files, the recipe, the
plugin's key, and for a Python plugin the base image's id and this interpreter's bytecode
version) with the one labelled on the existing image, so ``apply`` builds only when one of
them changed. A Dockerfile's own ``FROM`` image is not among them: after rebuilding that,
``dispatcher deploy --remove`` first. ``remove`` deletes only an image that ``apply``
built for the same plugin.
"""

from __future__ import annotations

import hashlib
import io
import py_compile
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import MAGIC_NUMBER, cache_from_source
from pathlib import Path
from typing import Any

from linchkit_plugin.errors import ProviderError, TargetUnavailable
from providers.deploy import Deployer, Plan, Progress, Step
from providers.docker.engine import LABEL_PLUGIN, Engine, EngineError
from providers.docker.target import DockerBuild, DockerTarget
from providers.target import PluginInfo

__all__ = ["LABEL_INPUTS", "DockerDeployer", "build_context"]

#: The digest of the inputs an image was built from; ``plan`` compares it.
LABEL_INPUTS = "org.linchkit.build-inputs"

# Never part of a plugin: caches and tooling that only slow the build down.
_SKIPPED = {"__pycache__", ".git", ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What the engine is sent: a tar of the context, and the Dockerfile's path in it."""

    tar: io.BytesIO
    dockerfile: str
    inputs: str  # the digest labelled on the image


class DockerDeployer(Deployer[DockerTarget]):
    """Builds, checks and removes the image behind a docker target."""

    def __init__(self, engine: Callable[[], Engine]) -> None:
        """``engine``: the started provider's connection (raises if it is not started)."""
        self._engine = engine

    async def plan(self, plugin: PluginInfo, target: DockerTarget) -> Plan:
        _, step = await self._compare(plugin, target)
        return Plan(target.describe(), (step,))

    async def apply(
        self, plugin: PluginInfo, target: DockerTarget, progress: Progress | None = None
    ) -> Plan:
        context, step = await self._compare(plugin, target)
        if step.action != "unchanged":
            step = await self._build(plugin, target, context)
        if progress is not None:
            progress(step)
        return Plan(target.describe(), (step,))

    async def remove(
        self, plugin: PluginInfo, target: DockerTarget, progress: Progress | None = None
    ) -> Plan:
        engine = self._engine()
        resource = f"image {target.image}"
        image = await _inspect(engine, target.image)
        if image is None:
            step = Step("unchanged", resource, "not in the local engine")
        elif _labels(image).get(LABEL_PLUGIN) != plugin.key:
            # Someone else's image under this tag: deploy did not make it, so it stays.
            step = Step("unchanged", resource, f"not built by dispatcher deploy for {plugin.key}")
        else:
            try:
                await engine.remove_image(target.image)
            except EngineError as error:
                raise ProviderError(
                    f"removing {target.image} of {plugin.key} failed: {error.message}"
                ) from error
            step = Step("removed", resource, _short_id(image))
        if progress is not None:
            progress(step)
        return Plan(target.describe(), (step,))

    async def _compare(self, plugin: PluginInfo, target: DockerTarget) -> tuple[BuildContext, Step]:
        """The build context, and whether the existing image was built from the same."""
        build = _recipe(plugin, target)
        engine = self._engine()
        base_id = ""
        if build.entrypoint is not None:
            base = await _inspect(engine, build.base_image)
            base_id = str(base["Id"]) if base is not None else "absent"
        context = build_context(plugin, build, base_id)
        resource = f"image {target.image}"
        image = await _inspect(engine, target.image)
        if image is not None and _labels(image).get(LABEL_INPUTS) == context.inputs:
            return context, Step("unchanged", resource, f"{_short_id(image)}, same inputs")
        recipe = (
            f"{build.entrypoint} on {build.base_image}"
            if build.entrypoint is not None
            else f"{build.dockerfile}"
        )
        return context, Step("build", resource, f"from {build.context}: {recipe}")

    async def _build(self, plugin: PluginInfo, target: DockerTarget, context: BuildContext) -> Step:
        engine = self._engine()
        started = time.perf_counter()
        labels = {LABEL_PLUGIN: plugin.key, LABEL_INPUTS: context.inputs}
        try:
            await engine.build(context.tar, context.dockerfile, target.image, labels)
            image = await engine.image(target.image)
        except EngineError as error:
            raise ProviderError(
                f"building {target.image} for {plugin.key} failed: {error.message}"
            ) from error
        if image is None:
            raise ProviderError(f"building {target.image} for {plugin.key} left no image")
        size_mb = float(image.get("Size", 0)) / 1e6
        seconds = time.perf_counter() - started
        detail = f"{_short_id(image)}, {size_mb:.0f} MB, in {seconds:.1f} s"
        return Step("built", f"image {target.image}", detail)


def build_context(plugin: PluginInfo, build: DockerBuild, base_id: str = "") -> BuildContext:
    """The build context as a tar: the plugin's folder, plus a Dockerfile for Python plugins.

    Python sources are compiled here into ``__pycache__`` (the container's root filesystem
    is read-only, so the plugin could never cache them itself). The pyc files only help
    when this interpreter's version matches the base image's; otherwise they are ignored.
    """
    buffer = io.BytesIO()
    inputs = hashlib.blake2b(digest_size=16)
    recipe = [plugin.key, build.entrypoint or "", build.dockerfile or "", build.base_image]
    if build.entrypoint is not None:
        recipe += [base_id, MAGIC_NUMBER.hex()]
    inputs.update("\0".join(recipe).encode())
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(build.context.rglob("*")):
            relative = path.relative_to(build.context)
            if _SKIPPED.intersection(relative.parts) or not path.is_file():
                continue
            inputs.update(f"\0{relative}\0".encode())
            inputs.update(path.read_bytes())
            tar.add(path, arcname=str(relative), recursive=False)
            if build.entrypoint is not None and path.suffix == ".py":
                with tempfile.TemporaryDirectory() as scratch:
                    compiled = Path(scratch) / "module.pyc"
                    try:
                        py_compile.compile(
                            str(path),
                            cfile=str(compiled),
                            doraise=True,
                            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
                        )
                    except py_compile.PyCompileError as error:
                        raise ProviderError(error.msg) from None
                    cached = Path(cache_from_source(str(relative)))
                    tar.add(compiled, arcname=str(cached))
        dockerfile_path = build.dockerfile or ".linchkit.Dockerfile"
        if build.dockerfile is None:
            dockerfile = (
                f"FROM {build.base_image}\n"
                "COPY . /plugin/\n"
                f'LABEL {LABEL_PLUGIN}="{plugin.key}"\n'
                f'CMD ["{build.entrypoint}", "--path", "/plugin"]\n'
            ).encode()
            info = tarfile.TarInfo(dockerfile_path)
            info.size = len(dockerfile)
            tar.addfile(info, io.BytesIO(dockerfile))
    buffer.seek(0)
    return BuildContext(buffer, dockerfile_path, inputs.hexdigest())


def _recipe(plugin: PluginInfo, target: DockerTarget) -> DockerBuild:
    if target.build is None:
        raise ProviderError(f"target {target.image} has no 'build' section to deploy from")
    if not target.build.context.is_dir():
        raise ProviderError(f"build context {target.build.context} is not a folder")
    return target.build


async def _inspect(engine: Engine, tag: str) -> dict[str, Any] | None:
    try:
        return await engine.image(tag)
    except EngineError as error:
        if error.status == 900:  # the connection broke since start: worth another try
            raise TargetUnavailable(f"the Docker engine is unreachable: {error.message}") from error
        raise ProviderError(f"cannot inspect image {tag}: {error.message}") from error


def _labels(image: dict[str, Any]) -> dict[str, str]:
    return (image.get("Config") or {}).get("Labels") or {}


def _short_id(image: dict[str, Any]) -> str:
    return str(image["Id"])[7:19]  # "sha256:" and the first 12 hex digits, as `docker images`
