"""``dispatcher new``: scaffold a plugin in a fresh folder, ready to test, serve and call.

A scaffold is the files of ``templates/<language>/`` with their placeholders filled in:
``{{name}}`` (the plugin's id, as given), ``{{module}}`` (the name as an identifier),
``{{class}}`` (the plugin class or type), ``{{checkout}}`` (the checkout holding that
SDK, which the dispatcher is installed from) and ``{{sdk}}`` (the SDK checkout a compiled
language depends on until the SDKs are published); a language may add its own, taken from
the SDK so that the scaffold builds offline at once, with the versions the SDK is tested
with: Go, the SDK's ``go`` version, requirements and ``go.sum``; Rust, its ``Cargo.lock``;
Java, its version (what ``mvn install`` there installs) and JUnit's; TypeScript, its
TypeScript and Node types versions and a ``package-lock.json`` made from its own. A template
file ends in ``.tmpl`` so that no linter, compiler or test runner of this repository
mistakes it for code; the placeholders may appear in file names too. A file that starts with
``#!`` is written executable (the wrapper a ``plugins.yaml`` launches). Nothing is
overwritten: the folder must not exist, or be empty.
"""

from __future__ import annotations

import json
import os
import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import click

from dispatcher.cli._app import main

#: Languages a plugin can be scaffolded in: the folders of ``templates/``.
LANGUAGES = ("python", "go", "rust", "java", "typescript")

#: A plugin id that is also a safe folder name: lowercase words joined by single hyphens.
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*\Z")
_MAX_NAME = 64
_TEMPLATE_SUFFIX = ".tmpl"
#: Words Java reserves, which a package name cannot be (``dispatcher new new --lang java``
#: wrote ``package com.example.new;``, which javac refuses).
# fmt: off
_JAVA_KEYWORDS = frozenset({
    "abstract", "assert", "boolean", "break", "byte", "case", "catch", "char", "class",
    "const", "continue", "default", "do", "double", "else", "enum", "extends", "final",
    "finally", "float", "for", "goto", "if", "implements", "import", "instanceof", "int",
    "interface", "long", "native", "new", "package", "private", "protected", "public",
    "return", "short", "static", "strictfp", "super", "switch", "synchronized", "this",
    "throw", "throws", "transient", "try", "void", "volatile", "while", "true", "false",
    "null",
})
# fmt: on
#: Where a compiled language's SDK lives in this repository's checkout.
_CHECKOUT = Path(__file__).resolve().parents[2]


@main.command()
@click.argument("name")
@click.option(
    "--lang",
    "language",
    type=click.Choice(LANGUAGES),
    default="python",
    show_default=True,
    help="Language of the plugin.",
)
@click.option(
    "--sdk",
    "sdk_path",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The SDK to depend on (compiled languages): a checkout's sdk/<lang> folder"
    " (default: this dispatcher's own checkout).",
)
def new(name: str, language: str, sdk_path: Path | None) -> None:
    """Scaffold the plugin NAME in ./NAME: its code, a plugins.yaml entry, a passing test
    and a README saying how to serve, call and deploy it.

    NAME is the plugin's id: lowercase letters, digits and single hyphens (e.g. greeter,
    order-totals).
    """
    if len(name) > _MAX_NAME or not _NAME.fullmatch(name):
        raise click.BadParameter(
            f"{name!r} is not a plugin name: use lowercase letters, digits and single"
            f" hyphens, starting with a letter, at most {_MAX_NAME} characters (e.g. order-totals)",
            param_hint="NAME",
        )
    try:
        os.getcwd()
    except FileNotFoundError:
        raise click.UsageError("the current folder no longer exists: cd into one") from None
    folder = Path(name)
    if folder.is_symlink() or folder.is_file() or (folder.is_dir() and any(folder.iterdir())):
        raise click.UsageError(f"{folder}/ already exists and is not empty: nothing was written")
    sdk = _sdk_folder(language, sdk_path)
    module = name.replace("-", "_")
    if language == "java" and module in _JAVA_KEYWORDS:
        module += "_"  # the Java Language Specification's advice for a package name (6.1)
    values = {
        "name": name,
        "module": module,
        "class": "".join(word.capitalize() for word in name.split("-")),
        "sdk": str(sdk) if sdk is not None else "",
        # The checkout the SDK is part of (sdk/<lang>): the dispatcher installs from it.
        "checkout": str(sdk.parents[1]) if sdk is not None else "",
    }
    if language == "go" and sdk is not None:
        values |= _go_values(sdk)
    if language == "rust" and sdk is not None:
        values |= _rust_values(sdk)
    if language == "java" and sdk is not None:
        values |= _java_values(sdk)
    if language == "typescript" and sdk is not None:
        values |= _typescript_values(sdk, folder, values)
    written = _render(files("dispatcher.cli") / "templates" / language, folder, values)
    click.echo(f"Created the {language} plugin {name!r} in {folder}/:")
    for path in written:
        click.echo(f"  {path}")
    click.echo(f"Next: cd {folder} and follow its README.md (run its test first).")


def _sdk_folder(language: str, given: Path | None) -> Path | None:
    if language == "python":
        return None  # a pip dependency, named in the scaffold's pyproject.toml
    folder = (given or _CHECKOUT / "sdk" / language).resolve()
    if not folder.is_dir():
        raise click.UsageError(
            f"no {language} SDK at {folder}: pass --sdk with the sdk/{language} folder of a"
            " checkout of the dispatcher"
        )
    return folder


def _go_values(sdk: Path) -> dict[str, str]:
    """The SDK's ``go`` version and requirements, and its ``go.sum``: a module that
    replaces the SDK by a folder must list what the SDK needs itself."""
    try:
        go_mod = (sdk / "go.mod").read_text(encoding="utf-8")
        go_sum = (sdk / "go.sum").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise click.UsageError(f"{sdk} is not the Go SDK: {error}") from None
    version = re.search(r"^go (\S+)$", go_mod, re.MULTILINE)
    blocks = re.findall(r"^require \(\n(.*?)^\)", go_mod, re.MULTILINE | re.DOTALL)
    singles = re.findall(r"^require ([^(\s]\S* \S+)", go_mod, re.MULTILINE)
    requirements = [line.split("//")[0].strip() for block in blocks for line in block.splitlines()]
    requirements += singles
    return {
        "go_version": version.group(1) if version else "1.22",
        "go_requires": "".join(f"\t{line} // indirect\n" for line in requirements if line),
        "go_sum": go_sum.rstrip("\n"),
    }


def _rust_values(sdk: Path) -> dict[str, str]:
    """The SDK's ``Cargo.lock``, the scaffold's first: the crate versions the SDK is tested
    with, which are also the ones in cargo's cache once the SDK was built (offline)."""
    try:
        cargo_lock = (sdk / "Cargo.lock").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise click.UsageError(f"{sdk} is not the Rust SDK: {error}") from None
    return {"cargo_lock": cargo_lock.rstrip("\n")}


def _java_values(sdk: Path) -> dict[str, str]:
    """The SDK's version (what ``mvn install`` there installs) and its JUnit version (in
    ``~/.m2`` once the SDK was built, so the plugin's test runs offline)."""
    try:
        pom = (sdk / "pom.xml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise click.UsageError(f"{sdk} is not the Java SDK: {error}") from None
    # The project's own version: the first <version> after its <artifactId>.
    version = re.search(r"<artifactId>linchkit-plugin-sdk</artifactId>\s*<version>([^<]+)<", pom)
    junit = re.search(r"<junit\.version>([^<]+)<", pom)
    if version is None or junit is None:
        raise click.UsageError(f"{sdk}/pom.xml names no SDK version or junit.version")
    return {"java_sdk_version": version.group(1), "junit_version": junit.group(1)}


def _typescript_values(sdk: Path, folder: Path, values: dict[str, str]) -> dict[str, str]:
    """The SDK's TypeScript and Node types versions, and a ``package-lock.json``: the SDK's
    own lock (the versions it is tested with, in npm's cache once the SDK was built, so
    ``npm ci --offline`` works) with this plugin as its root and the SDK as a folder."""
    try:
        package = json.loads((sdk / "package.json").read_text(encoding="utf-8"))
        lock = json.loads((sdk / "package-lock.json").read_text(encoding="utf-8"))
        development = package["devDependencies"]
        values = values | {
            "typescript_version": development["typescript"],
            "types_node_version": development["@types/node"],
        }
        packages = dict(lock["packages"])
        sdk_entry = packages.pop("")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise click.UsageError(f"{sdk} is not the TypeScript SDK: {error!r}") from None
    template = files("dispatcher.cli") / "templates" / "typescript" / "package.json.tmpl"
    plugin = json.loads(_fill(template.read_text(encoding="utf-8"), values))
    relative = os.path.relpath(sdk, folder.resolve())
    root = {key: plugin[key] for key in ("name", "version", "dependencies", "devDependencies")}
    linked = {"version": sdk_entry["version"], "resolved": f"file:{relative}"}
    linked |= {
        key: sdk_entry[key] for key in ("license", "dependencies", "engines") if key in sdk_entry
    }
    plugin_lock = {
        "name": plugin["name"],
        "version": plugin["version"],
        "lockfileVersion": lock["lockfileVersion"],
        "requires": True,
        "packages": {"": root, f"node_modules/{package['name']}": linked, **packages},
    }
    return {
        "typescript_version": values["typescript_version"],
        "types_node_version": values["types_node_version"],
        "package_lock": json.dumps(plugin_lock, indent=2),
    }


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def _render(template: Traversable, destination: Path, values: dict[str, str]) -> list[Path]:
    """Write ``template`` (a folder of templates) into ``destination``; the written paths."""
    written: list[Path] = []
    for entry in sorted(template.iterdir(), key=lambda entry: entry.name):
        target = destination / _fill(entry.name, values)
        if entry.is_dir():
            written += _render(entry, target, values)
        elif entry.name.endswith(_TEMPLATE_SUFFIX):
            target = target.with_name(target.name.removesuffix(_TEMPLATE_SUFFIX))
            target.parent.mkdir(parents=True, exist_ok=True)
            text = _fill(entry.read_text(encoding="utf-8"), values)
            target.write_text(text, encoding="utf-8")
            if text.startswith("#!"):
                target.chmod(0o755)  # a wrapper plugins.yaml launches
            written.append(target)
    return written
