"""``dispatcher schema``: the JSON Schema of the manifest, for editors and CI.

The schema is pydantic's, of the same model the loader validates with: ``Manifest``
specialised to the target models of every registered provider (third-party ones
included), so it cannot drift from what ``dispatcher validate`` accepts on the shape of a
file. Two adjustments make it fit a file as written rather than as parsed:

* a scalar that is not a plain string (a number, a flag, an enum, a constrained string)
  may also be a ``${ENV_VAR}`` / ``${ENV_VAR:-default}`` reference, which the loader
  substitutes before validating;
* the generic models' definitions get their short names (``PluginSpec``, not the
  specialisation's 200-character name), which editors show in hovers and errors.

What the schema cannot say, ``dispatcher validate`` still checks: cross-field rules (a
method without a target, two credentials on one target), egress, existing paths.
"""

from __future__ import annotations

from typing import Any

import click
import orjson

from dispatcher.cli._app import main
from dispatcher.config.loader import manifest_model

__all__ = ["ENV_REFERENCE_SCHEMA", "manifest_json_schema"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

#: A ``${NAME}`` or ``${NAME:-default}`` reference, as the loader substitutes it.
ENV_REFERENCE_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}",
    "description": "An environment variable, substituted when the manifest loads.",
}

_CONSTRAINED_STRING = ("pattern", "format", "minLength", "maxLength")


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of a manifest, with every registered provider's targets."""
    schema = manifest_model().model_json_schema()
    schema = _short_definition_names(schema)
    schema = _allow_env_references(schema)
    return {
        "$schema": SCHEMA_DIALECT,
        **schema,
        "title": "LinchKit dispatcher manifest (plugins.yaml)",
    }


@main.command()
def schema() -> None:
    """Print the JSON Schema of the manifest (plugins.yaml), for editors and CI.

    Save it and point the YAML language server at it from the manifest's first line:
    `# yaml-language-server: $schema=./plugins.schema.json`. It covers the providers
    installed here, third-party ones included.
    """
    click.echo(orjson.dumps(manifest_json_schema(), option=orjson.OPT_INDENT_2).decode())


def _short_definition_names(schema: dict[str, Any]) -> dict[str, Any]:
    definitions: dict[str, Any] = schema.get("$defs", {})
    renames = {
        name: name.split("_", 1)[0]
        for name in definitions
        if "_" in name and name.split("_", 1)[0] not in definitions
    }
    text = orjson.dumps(schema).decode()
    for old, new in renames.items():
        text = text.replace(f'"#/$defs/{old}"', f'"#/$defs/{new}"')
    renamed: dict[str, Any] = orjson.loads(text)
    renamed["$defs"] = {renames.get(name, name): value for name, value in renamed["$defs"].items()}
    return renamed


def _allow_env_references(node: Any) -> Any:
    """``node`` with each non-plain scalar schema also accepting ``${ENV_VAR}``."""
    if isinstance(node, list):
        return [_allow_env_references(each) for each in node]
    if not isinstance(node, dict):
        return node
    walked = {key: _allow_env_references(value) for key, value in node.items()}
    if _is_substitutable(node):
        return {"anyOf": [walked, ENV_REFERENCE_SCHEMA]}
    return walked


def _is_substitutable(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    if kind in ("integer", "number", "boolean") or "enum" in node:
        return True
    return kind == "string" and any(key in node for key in _CONSTRAINED_STRING)
