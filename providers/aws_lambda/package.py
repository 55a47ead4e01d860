"""The function ``dispatcher deploy`` makes: its zip (``build_package``) and configuration.

The zip holds, and only holds, what the handler runs:

* the plugin's folder (``deploy.path``) or module, less what ``.dispatcherignore`` and
  its defaults leave out (``ignore``: caches, tests, logs, ``.env`` …);
* ``linchkit_handler.py``, generated: ``handler = lambda_handler(Plugin)``;
* the plugin SDK ``linchkit_plugin``: the modules ``linchkit_plugin.aws_lambda`` loads at
  import (found by reading their ``import`` lines), so neither the gRPC code (``_proto``,
  ``grpc_server``) nor the other servers go with it;
* the installed files of the SDK's own requirements (``orjson``) and of the target's
  ``requirements``, with theirs, taken from the running environment: offline, and the
  same wheels the tests ran against.

Never the host (``dispatcher``, ``providers``) nor its dependencies: a plugin on Lambda is
called by a dispatcher, it is not one. The zip is byte-for-byte reproducible (sorted
entries, fixed timestamps, modes reduced to 644/755, ignored files never read), so its
``CodeSha256`` changes only when the code does: that is what makes a second deploy a no-op.

Vendoring from the running environment assumes it matches Lambda's: Linux x86_64,
CPython 3.11 (``runtime: python3.11``); deploy refuses to package from anything else.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import platform
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from linchkit_plugin.aws_lambda import CONFIG_ENVIRONMENT_VARIABLE
from linchkit_plugin.errors import ProviderError
from linchkit_plugin.wire import encode_json
from providers._log_lines import printable
from providers.aws_lambda.ignore import plugin_folder_files
from providers.aws_lambda.target import LambdaDeploySettings, LambdaTarget
from providers.target import PluginInfo

__all__ = [
    "HANDLER",
    "SDK_ENTRY",
    "FunctionSpec",
    "Package",
    "bare_function_name",
    "build_package",
    "describe_function",
    "function_spec",
    "settings_of",
    "write_package",
]

HANDLER = "linchkit_handler.handler"
#: The SDK module the generated handler imports; the zip carries what it needs.
SDK_ENTRY = "linchkit_plugin.aws_lambda"
SDK_DISTRIBUTION = "linchkit-plugin"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_READ_ONLY, _EXECUTABLE = 0o644, 0o755
_UNIX = 3  # ZipInfo.create_system: the mode in external_attr is read as Unix permissions


@dataclass(frozen=True, slots=True)
class Package:
    """The function's code: a reproducible zip and its Lambda-style hash."""

    zip_bytes: bytes
    files: int

    @property
    def code_sha256(self) -> str:
        """``CodeSha256`` as Lambda reports it: base64 of the SHA-256 of the zip."""
        return base64.b64encode(hashlib.sha256(self.zip_bytes).digest()).decode("ascii")

    def names(self) -> list[str]:
        with zipfile.ZipFile(io.BytesIO(self.zip_bytes)) as archive:
            return archive.namelist()

    def describe(self) -> str:
        return f"{len(self.zip_bytes) / 1e6:.2f} MB, {self.files} files"


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


def settings_of(plugin: PluginInfo, target: LambdaTarget) -> LambdaDeploySettings:
    """The target's deploy settings; a ``ProviderError`` saying what to add if it has none."""
    if target.deploy is None:
        raise ProviderError(
            f"{plugin.key}: the lambda target {target.function_name} has no 'deploy' settings "
            "(role, entrypoint, path); add them to deploy it"
        )
    return target.deploy


def function_spec(plugin: PluginInfo, target: LambdaTarget) -> FunctionSpec:
    """The configuration ``deploy`` gives the function behind ``target``."""
    settings = settings_of(plugin, target)
    environment = dict(settings.environment)
    if plugin.config:
        environment[CONFIG_ENVIRONMENT_VARIABLE] = encode_json(
            plugin.config, sort_keys=True
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


def describe_function(spec: FunctionSpec, package: Package) -> str:
    """The function ``deploy`` makes, as text (the plan's document), without asking AWS."""
    configuration = spec.configuration()
    variables = sorted(configuration.pop("Environment")["Variables"])
    lines = [f"function {spec.name} ({spec.architecture})"]
    lines += [f"  {key}: {value}" for key, value in configuration.items()]
    lines.append(f"  Environment: {', '.join(variables) or '-'}")
    lines.append(f"  CodeSha256: {package.code_sha256} ({len(package.zip_bytes)} bytes)")
    lines.append(f"  alias {spec.alias} → the version published from it")
    return "\n".join(lines)


def build_package(plugin: PluginInfo, target: LambdaTarget) -> Package:
    """The reproducible zip for ``plugin`` (see the module docstring)."""
    settings = settings_of(plugin, target)
    _check_platform(settings.runtime)
    # name in the zip → (content, mode): only what the code is, never when or by whom.
    entries: dict[str, tuple[bytes, int]] = {}
    module, _, attribute = settings.entrypoint.partition(":")
    for name, content, mode in _plugin_files(module, settings.path):
        entries[name] = (content, mode)
    for name, content in _sdk_files():
        entries.setdefault(name, (content, _READ_ONLY))
    for distribution in _closure([*_sdk_requirements(), *settings.requirements]):
        for name, content in _distribution_files(distribution):
            entries.setdefault(name, (content, _READ_ONLY))
    handler = _handler_source(module, attribute)
    entries[HANDLER.partition(".")[0] + ".py"] = (handler, _READ_ONLY)
    return Package(_reproducible_zip(entries), len(entries))


def bare_function_name(function_name: str) -> str:
    """``echo`` from ``echo``, ``echo:live`` or ``arn:aws:lambda:…:function:echo[:live]``."""
    if function_name.startswith("arn:"):
        return function_name.split(":")[6]
    return function_name.partition(":")[0]


def write_package(package: Package, out_dir: Path, function_name: str) -> Path:
    """``package`` as ``out_dir/<function name>.zip``, written whole or not at all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    destination = out_dir / f"{bare_function_name(function_name)}.zip"
    descriptor, partial = tempfile.mkstemp(dir=out_dir, prefix=".", suffix=".zip.partial")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(package.zip_bytes)
        os.chmod(partial, 0o644)
        os.replace(partial, destination)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return destination


def _reproducible_zip(entries: dict[str, tuple[bytes, int]]) -> bytes:
    """The same bytes for the same entries, on any day, from any checkout: entries sorted,
    one fixed timestamp, Unix modes reduced to 644 or 755, no extra fields, one level of
    compression (the same zlib gives the same bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for name in sorted(entries):
            content, mode = entries[name]
            info = zipfile.ZipInfo(name, _FIXED_TIME)
            info.create_system = _UNIX
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)
    return buffer.getvalue()


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
        f"from {SDK_ENTRY} import lambda_handler\n"
        f"from {module} import {attribute}\n\n"
        f"handler = lambda_handler({attribute})\n"
    ).encode()


def _walk(folder: Path, prefix: str = "") -> Iterator[tuple[str, bytes, int]]:
    """The folder's files that ``.dispatcherignore`` keeps (``ignore``), with their mode:
    755 if the owner may run it (a bundled tool), else 644, whatever the umask was."""
    for relative, path in plugin_folder_files(folder):
        content, mode = _read(path)
        yield prefix + relative, content, mode


def _read(path: Path) -> tuple[bytes, int]:
    """A plugin file's content and zip mode; a file the user cannot read stops the package
    with a ``ProviderError`` that says so (the caller's ``OSError`` means a write failed)."""
    try:
        executable = path.stat().st_mode & 0o100
        return path.read_bytes(), _EXECUTABLE if executable else _READ_ONLY
    except OSError as error:
        raise ProviderError(
            f"cannot read {printable(str(path))}: {error.strerror or error}"
        ) from error


def _plugin_files(module: str, path: Path | None) -> Iterator[tuple[str, bytes, int]]:
    if path is not None:
        if not path.is_dir():
            raise ProviderError(f"plugin path {path} is not a folder")
        yield from _walk(path)
        return
    origin, top = _module_origin(module)
    if origin.name == "__init__.py":
        yield from _walk(origin.parent, f"{top}/")
    else:
        yield origin.name, _read(origin)[0], _READ_ONLY


def _module_origin(module: str) -> tuple[Path, str]:
    """The file the plugin's top-level module is loaded from, and that module's name."""
    top = module.partition(".")[0]
    if top == "__main__":  # the program running deploy (or nothing), never the plugin
        raise ProviderError(
            "the plugin module '__main__' names whatever program runs, not a file to "
            "package: name the plugin's own module in 'entrypoint'"
        )
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError) as error:  # ``__main__``: its __spec__ is None
        raise ProviderError(
            f"cannot find the plugin module {top!r} ({error}); set 'path' in deploy"
        ) from error
    if spec is None or spec.origin is None:
        raise ProviderError(f"cannot find the plugin module {top!r}; set 'path' in deploy")
    origin = Path(spec.origin)
    if not origin.is_file():  # "built-in", "frozen": part of Python, nothing to package
        raise ProviderError(
            f"the plugin module {top!r} is not a file ({printable(spec.origin)}), so there "
            "is nothing to package: name the plugin's own module in 'entrypoint'"
        )
    return origin, top


def _sdk_files() -> Iterator[tuple[str, bytes]]:
    """The SDK modules ``SDK_ENTRY`` imports when loaded, each with its package's ``__init__``.

    Follows module-level ``import`` lines (not those inside functions: those are the lazy
    imports of other servers' dependencies), from the entry module and every package on
    its way, within ``linchkit_plugin``.
    """
    package = SDK_ENTRY.partition(".")[0]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ProviderError(f"cannot find the plugin SDK {package!r} to vendor")
    root = Path(next(iter(spec.submodule_search_locations))).parent
    wanted = [SDK_ENTRY]
    seen: set[str] = set()
    while wanted:
        parts = wanted.pop().split(".")
        # ``a.b.c`` needs ``a/__init__``, ``a/b/__init__`` and ``a/b/c`` (a module or a package).
        for depth in range(1, len(parts) + 1):
            dotted = ".".join(parts[:depth])
            if dotted in seen:
                continue
            path = _module_path(root, dotted)
            if path is None:
                raise ProviderError(f"the plugin SDK has no module {dotted} (in {root})")
            seen.add(dotted)
            source = path.read_bytes()
            wanted += _sdk_imports(root, source, dotted, is_package=path.name == "__init__.py")
            yield path.relative_to(root).as_posix(), source


def _module_path(root: Path, dotted: str) -> Path | None:
    base = root.joinpath(*dotted.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _sdk_imports(root: Path, source: bytes, module: str, *, is_package: bool) -> list[str]:
    """The modules of ``module``'s package that ``source`` imports at module level."""
    package = module.partition(".")[0]
    here = module if is_package else module.rpartition(".")[0]
    found: list[str] = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            found.append(base)
            # ``from pkg import name`` imports a submodule when ``name`` is one.
            found += [
                f"{base}.{alias.name}"
                for alias in node.names
                if _module_path(root, f"{base}.{alias.name}") is not None
            ]
    return [name for name in found if name.partition(".")[0] == package]


def _sdk_requirements() -> list[str]:
    """What the SDK distribution needs at run time without extras (orjson)."""
    from packaging.requirements import Requirement

    try:
        requires = importlib.metadata.requires(SDK_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise ProviderError(
            f"{SDK_DISTRIBUTION!r} is not installed here; deploy vendors installed packages"
        ) from None
    names = []
    for requirement in requires:
        parsed = Requirement(requirement)
        if parsed.marker is None or parsed.marker.evaluate({"extra": ""}):
            names.append(parsed.name)
    return names


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
