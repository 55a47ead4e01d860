"""The gateway's OpenAPI 3.1 document, generated from the manifest once at start.

One path per plugin method (``POST /v1/plugins/{plugin}/methods/{method}``): the
method's ``params_schema`` is its request body's schema (any JSON when it has none), its
answers the envelopes of ``docs/protocol.md`` with the statuses of
``dispatcher.gateway.errors``. A plugin at several versions is described at its highest
(the default a call without ``X-Plugin-Version`` goes to). With a state backend that
keeps jobs (Redis), each method also has its ``…:submit`` path and the job routes
(``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/result``) are described. A params schema's local
``$ref``s (``#/$defs/…``) are rewritten to point into the component that holds it, since
in the document ``#`` is the document's root. Under the manifest's ``access`` the
gateway serves each caller the document of what it may call (``allows``): a method it may
not call is not in it, nor a plugin it may call nothing of.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from dispatcher._routes import version_key
from dispatcher.config import DEFAULT_TIMEOUT_MS, Manifest, PluginSpec
from dispatcher.gateway.errors import STATUS_BY_TYPE

__all__ = ["Allows", "openapi_document"]

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "message"],
    "properties": {
        "type": {
            "type": "string",
            "description": "A stable dispatcher type (invalid_params, …) or the plugin's own error name.",
        },
        "message": {"type": "string"},
        "retryable": {"type": "boolean"},
        "details": {"type": "object"},
        "retry_after": {"type": "number", "minimum": 0, "description": "Seconds."},
    },
}
_ERROR_ENVELOPE: dict[str, Any] = {
    "type": "object",
    "required": ["ok", "error"],
    "properties": {"ok": {"const": False}, "error": {"$ref": "#/components/schemas/Error"}},
}
_OK_ENVELOPE: dict[str, Any] = {
    "type": "object",
    "required": ["ok", "result"],
    "properties": {"ok": {"const": True}, "result": {}},
}

_JOB_ACCEPTED: dict[str, Any] = {
    "type": "object",
    "required": ["ok", "job_id", "location"],
    "properties": {
        "ok": {"const": True},
        "job_id": {"type": "string"},
        "location": {"type": "string", "description": "/v1/jobs/{job_id}"},
    },
}
_JOB_ENVELOPE: dict[str, Any] = {
    "type": "object",
    "required": ["ok", "job"],
    "properties": {
        "ok": {"const": True},
        "job": {
            "type": "object",
            "required": ["id", "plugin", "method", "state", "attempts", "submitted_at"],
            "properties": {
                "id": {"type": "string"},
                "plugin": {"type": "string"},
                "version": {"type": "string"},
                "method": {"type": "string"},
                "state": {"enum": ["queued", "running", "retrying", "succeeded", "failed", "dead"]},
                "attempts": {"type": "integer", "minimum": 0},
                "caller": {"type": "string"},
                "params": {},
                "result": {"description": "Once succeeded."},
                "error": {
                    "$ref": "#/components/schemas/Error",
                    "description": "What it ended with (failed, dead), or while it runs"
                    " again its last attempt's; none once succeeded",
                },
                "previous_error": {
                    "$ref": "#/components/schemas/Error",
                    "description": "Succeeded after failed attempts: the last one's error;"
                    " redriven: the one it was dead-lettered with",
                },
                "submitted_at": {"type": "integer", "description": "ms since the epoch"},
                "started_at": {"type": "integer", "description": "its last attempt's start"},
                "finished_at": {"type": "integer"},
            },
        },
    },
}

_JOB_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$"},
    },
    {
        "name": "wait",
        "in": "query",
        "description": "Seconds to wait for the job to end (at most the gateway's max_job_wait).",
        "schema": {"type": "number", "minimum": 0},
    },
]

_HEADERS: dict[str, dict[str, Any]] = {
    "PluginVersion": {
        "name": "X-Plugin-Version",
        "in": "header",
        "description": "The plugin version to call (default: the highest in the manifest).",
        "schema": {"type": "string"},
    },
    "TimeoutMs": {
        "name": "X-Timeout-Ms",
        "in": "header",
        "description": "The call's deadline in milliseconds (default: the method's timeout_ms).",
        "schema": {"type": "integer", "minimum": 1, "maximum": 86_400_000},
    },
    "RequestTimeout": {
        "name": "Request-Timeout",
        "in": "header",
        "description": "The call's deadline in seconds, if X-Timeout-Ms is not sent.",
        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 86_400},
    },
    "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "schema": {"type": "string", "maxLength": 256},
    },
    "Traceparent": {
        "name": "traceparent",
        "in": "header",
        "description": "W3C trace context; passed to the plugin. An invalid one is ignored.",
        "schema": {"type": "string"},
    },
    "CallbackUrl": {
        "name": "X-Callback-Url",
        "in": "header",
        "description": "Submit only: POST the job's record here when it ends (within the"
        " manifest's egress; signed with X-Linchkit-Signature when jobs.callback_secret is set).",
        "schema": {"type": "string", "maxLength": 2048},
    },
    "RequestId": {
        "name": "X-Request-Id",
        "in": "header",
        "description": "The call's id (1-128 of A-Z a-z 0-9 . _ : -); made up when absent.",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
    },
}

_STATUS_TEXT = {
    400: "Invalid params: malformed JSON, nested too deep, not matching the method's schema, a bad header",
    401: "No or wrong credentials",
    403: "The caller may not call this method",
    404: "No such plugin, version or method",
    408: "The request body did not arrive in time",
    413: "The request body is over the gateway's limit",
    415: "The request body is not application/json, or in a Content-Encoding the gateway"
    " does not decode (Accept-Encoding names those it does)",
    429: "Rate limited: come back after Retry-After seconds",
    500: "The plugin raised an error (its own type in error.type); for a job's result also"
    " result_too_large: the result was over the dispatcher's jobs.max_result_bytes, not kept",
    502: "The target broke the contract",
    503: "Unavailable, circuit open, overloaded or shutting down: retry after Retry-After seconds",
    501: "The gateway's state backend keeps no jobs (memory)",
    410: "The job the submission's Idempotency-Key names is no longer kept (error.type"
    " job_expired, error.details.job_id): a new request needs a new key",
    504: "The call's deadline passed",
}


#: Whether a caller may call ``method`` of ``plugin`` at ``version`` (``access``).
Allows = Callable[[str, str, str], bool]


def openapi_document(
    manifest: Manifest[Any],
    *,
    authenticated: bool,
    title: str = "LinchKit plugin gateway",
    allows: Allows | None = None,
    max_timeout_ms: int | None = None,
) -> dict[str, Any]:
    """The document for ``manifest``; ``authenticated`` adds the credentials calls need.
    With ``allows``, only the methods it allows at the version described (a plugin's
    highest) are: what one caller may call under the manifest's ``access``. With
    ``max_timeout_ms`` (the gateway's), the deadline headers say a longer one is cut to it."""
    latest: dict[str, PluginSpec[Any]] = {}
    for plugin in manifest.plugins:
        current = latest.get(plugin.id)
        if current is None or version_key(plugin.version) > version_key(current.version):
            latest[plugin.id] = plugin
    jobs = manifest.state.backend == "redis"
    schemas: dict[str, Any] = {
        "Error": _ERROR_SCHEMA,
        "ErrorEnvelope": _ERROR_ENVELOPE,
        "OkEnvelope": _OK_ENVELOPE,
    }
    if jobs:
        schemas |= {"JobAccepted": _JOB_ACCEPTED, "JobEnvelope": _JOB_ENVELOPE}
    paths: dict[str, Any] = {
        "/v1/plugins": {"get": _plain_get("listPlugins", "The plugins and their methods")},
        "/healthz": {"get": _plain_get("healthz", "The gateway process is alive")},
        "/readyz": {
            "get": _plain_get("readyz", "The dispatcher runs and takes calls (503 while draining)")
        },
    }
    for plugin_id in sorted(latest):
        plugin = latest[plugin_id]
        for method_name in sorted(plugin.methods):
            if allows is not None and not allows(plugin_id, plugin.version, method_name):
                continue
            component = f"{plugin_id}.{method_name}.params"
            schema = plugin.methods[method_name].params_schema
            schemas[component] = _rebased(schema, component) if schema is not None else {}
            path = f"/v1/plugins/{plugin_id}/methods/{method_name}"
            paths[path] = {"post": _operation(plugin, method_name, component)}
            if jobs:
                paths[f"{path}:submit"] = {
                    "post": _submit_operation(plugin, method_name, component)
                }
    if jobs:
        paths["/v1/jobs/{id}"] = {
            "get": _job_operation("getJob", "The job's record", "JobEnvelope")
        }
        paths["/v1/jobs/{id}/result"] = {
            "get": _job_operation(
                "getJobResult",
                "The job's result (failed or dead: its last error with its type's status,"
                " final: retryable false, no Retry-After, error.details.state)",
                "OkEnvelope",
            )
        }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": "1",
            "description": "Call plugin methods over HTTP through the dispatcher's policies"
            " (docs/gateway.md). Events: a WebSocket at /v1/events.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "parameters": _headers(max_timeout_ms),
            "responses": {
                str(status): {
                    "description": text,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorEnvelope"}
                        }
                    },
                }
                for status, text in _STATUS_TEXT.items()
            },
        },
    }
    if authenticated:
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        document["security"] = [{"bearer": []}, {"apiKey": []}]
    return document


def _headers(max_timeout_ms: int | None) -> dict[str, dict[str, Any]]:
    """``_HEADERS``, the deadline headers telling the gateway's cap when it has one. The
    schema's ``maximum`` stays what is accepted: a longer deadline is cut, not refused."""
    if max_timeout_ms is None:
        return _HEADERS
    cut = f" This gateway cuts a longer deadline to {max_timeout_ms} ms (max_timeout_ms)."
    return _HEADERS | {
        name: _HEADERS[name] | {"description": _HEADERS[name]["description"] + cut}
        for name in ("TimeoutMs", "RequestTimeout")
    }


def _operation(plugin: PluginSpec[Any], method: str, component: str) -> dict[str, Any]:
    spec = plugin.methods[method]
    timeout_ms = plugin.policies_of(method).timeout_ms or DEFAULT_TIMEOUT_MS
    # 501 (jobs_unavailable) is a job route's answer only, 410 (job_expired) a
    # submission's: not a call's.
    statuses = sorted({*STATUS_BY_TYPE.values(), 408, 413, 415} - {501, 410})
    return {
        "operationId": _operation_id(plugin.id, method),
        "summary": spec.description or f"Call {plugin.id}.{method}",
        "description": f"{plugin.id}@{plugin.version}; default deadline {timeout_ms} ms.",
        "tags": [plugin.id],
        "parameters": [{"$ref": f"#/components/parameters/{name}"} for name in _HEADERS],
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{component}"}}
            },
        },
        "responses": {
            "200": {
                "description": "The method's result",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/OkEnvelope"}}
                },
            },
            **{str(status): {"$ref": f"#/components/responses/{status}"} for status in statuses},
        },
    }


def _submit_operation(plugin: PluginSpec[Any], method: str, component: str) -> dict[str, Any]:
    operation = _operation(plugin, method, component)
    operation["operationId"] = "submit_" + operation["operationId"].removeprefix("call_")
    operation["summary"] = f"Submit {plugin.id}.{method} as an async job"
    wanted = ("PluginVersion", "IdempotencyKey", "CallbackUrl")
    operation["parameters"] = [{"$ref": f"#/components/parameters/{name}"} for name in wanted]
    operation["responses"]["501"] = {"$ref": "#/components/responses/501"}
    operation["responses"]["410"] = {"$ref": "#/components/responses/410"}
    responses = operation["responses"]
    del responses["200"]
    responses["202"] = {
        "description": "Queued; read it at Location",
        "headers": {"Location": {"schema": {"type": "string"}}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobAccepted"}}},
    }
    return operation


def _job_operation(operation_id: str, text: str, envelope: str) -> dict[str, Any]:
    """A job route: the caller's own job only (another caller's answers 404)."""
    responses: dict[str, Any] = {
        "200": {
            "description": text,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{envelope}"}}
            },
        },
        **{
            str(status): {"$ref": f"#/components/responses/{status}"}
            for status in (400, 401, 404, 501, 503)
        },
    }
    if operation_id == "getJobResult":
        responses["202"] = {
            "description": "Not finished yet (error.type job_not_finished): ask again after Retry-After",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}
            },
        }
        for status in sorted({*STATUS_BY_TYPE.values()} - {410}):  # a job's own error
            responses.setdefault(str(status), {"$ref": f"#/components/responses/{status}"})
    return {
        "operationId": operation_id,
        "tags": ["jobs"],
        "parameters": _JOB_PARAMETERS,
        "responses": responses,
    }


def _plain_get(operation_id: str, text: str) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "responses": {
            "200": {"description": text, "content": {"application/json": {"schema": {}}}}
        },
    }


def _operation_id(plugin: str, method: str) -> str:
    return "call_" + re.sub(r"[^A-Za-z0-9_]", "_", f"{plugin}__{method}")


def _rebased(schema: Any, component: str) -> Any:
    """``schema`` with its local ``$ref``s pointing into ``#/components/schemas/<component>``."""
    if isinstance(schema, dict):
        rebased = {key: _rebased(value, component) for key, value in schema.items()}
        reference = schema.get("$ref")
        if isinstance(reference, str) and reference.startswith("#"):
            escaped = component.replace("~", "~0").replace("/", "~1")
            rebased["$ref"] = f"#/components/schemas/{escaped}{reference[1:]}"
        return rebased
    if isinstance(schema, list):
        return [_rebased(item, component) for item in schema]
    return schema
