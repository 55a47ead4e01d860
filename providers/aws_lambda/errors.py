"""Every Lambda failure becomes a ``DispatchError`` here, and nowhere else.

200 + payload envelope                    the result, or the plugin's error
200 + X-Amz-Function-Error                PluginError(remote errorType, errorMessage);
                                          a Lambda timeout (Sandbox.Timedout) → DeadlineExceeded
ResourceNotFoundException (404)           PluginNotFound
TooManyRequestsException (429)            RateLimited, retry_after from Retry-After
RequestTooLargeException (413)            InvalidParams
AccessDenied / credentials refused        Forbidden / Unauthorized
ResourceNotReady / ResourceConflict,
5xx, connection errors                    TargetUnavailable (retryable)
other 4xx (bad zip, KMS, …)               ProviderError (misconfigured function)
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    Forbidden,
    InvalidParams,
    PluginError,
    PluginNotFound,
    ProviderError,
    RateLimited,
    TargetUnavailable,
    Unauthorized,
    bounded_retry_after,
)
from providers.aws_lambda.client import botocore_exceptions
from providers.aws_lambda.target import LambdaTarget

__all__ = ["function_error", "translate"]

_THROTTLES = frozenset({"TooManyRequestsException", "ThrottlingException"})
_NOT_READY = frozenset(
    {
        "ResourceNotReadyException",
        "ResourceConflictException",
        "ServiceException",
        "EC2ThrottledException",
        "ENILimitReachedException",
        "SubnetIPAddressLimitReachedException",
        "SnapStartNotReadyException",
        "SnapStartTimeoutException",
    }
)
_CREDENTIALS_REFUSED = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
    }
)


#: What a service is called in a message, and the variable that sends it elsewhere.
_SERVICES = {
    "lambda": ("Lambda", "AWS_ENDPOINT_URL_LAMBDA"),
    "logs": ("CloudWatch Logs", "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS"),
}


def translate(error: Exception, target: LambdaTarget, service: str = "lambda") -> DispatchError:
    """The dispatcher's error for a botocore/aiohttp exception raised by a call to
    ``service`` (``lambda`` or ``logs``) for ``target``."""
    if isinstance(error, DispatchError):
        return error
    exceptions = botocore_exceptions()
    where = target.describe()
    if isinstance(error, exceptions.ClientError):
        return _client_error(error, where)
    if isinstance(error, exceptions.ConnectTimeoutError | exceptions.ReadTimeoutError):
        return DeadlineExceeded(f"{where} timed out: {error}")
    if isinstance(error, exceptions.ConnectionError | exceptions.HTTPClientError):
        name = _SERVICES.get(service, _SERVICES["lambda"])[0]
        hint = _endpoint_hint(target, service)
        return TargetUnavailable(f"cannot reach {name} for {where}{hint}: {error}")
    if isinstance(error, exceptions.NoCredentialsError | exceptions.PartialCredentialsError):
        return Unauthorized(
            f"no usable AWS credentials for {where} ({error}); set them in the environment, "
            "~/.aws or the instance role"
        )
    if isinstance(error, exceptions.NoRegionError):
        return ProviderError(f"{where} has no region: set 'region' on the target or AWS_REGION")
    return ProviderError(f"{where} failed: {type(error).__name__}: {error}")


def _endpoint_hint(target: LambdaTarget, service: str) -> str:
    """Which setting chose the endpoint that could not be reached, to say what to check:
    the target's ``endpoint_url`` wins over the service's variable, then AWS_ENDPOINT_URL."""
    if target.endpoint_url:
        return ""  # the target names it, and the message names the target
    variable = _SERVICES.get(service, _SERVICES["lambda"])[1]
    for name in (variable, "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return f" (endpoint from {name})"
    return f" (AWS's own endpoint; {variable} sends it elsewhere)" if service == "logs" else ""


def function_error(kind: str, payload: bytes, target: LambdaTarget) -> DispatchError:
    """The error for a 200 with ``X-Amz-Function-Error``: the handler raised or timed out."""
    try:
        body = orjson.loads(payload) if payload else {}
    except orjson.JSONDecodeError:
        body = {"errorMessage": payload[:500].decode("utf-8", "replace")}
    if not isinstance(body, dict):
        body = {"errorMessage": str(body)}
    error_type = str(body.get("errorType") or "Lambda.FunctionError")
    message = str(body.get("errorMessage") or "the function failed without a message")
    details: dict[str, Any] = {"function_error": kind, "function": target.function_name}
    if isinstance(body.get("stackTrace"), list):
        details["stack_trace"] = body["stackTrace"]
    if error_type == "Sandbox.Timedout" or "Task timed out after" in message:
        return DeadlineExceeded(f"{target.describe()} timed out: {message}", details=details)
    return PluginError(message, remote_type=error_type, details=details)


def _client_error(error: Any, where: str) -> DispatchError:
    response = error.response
    # botocore names the call; a denied deploy or logs call is not a denied Invoke.
    operation = str(getattr(error, "operation_name", "") or "Invoke")
    code = str(response.get("Error", {}).get("Code", "Unknown"))
    message = str(response.get("Error", {}).get("Message") or response.get("message") or code)
    metadata = response.get("ResponseMetadata", {})
    status = int(metadata.get("HTTPStatusCode") or 0)
    headers = {key.lower(): value for key, value in (metadata.get("HTTPHeaders") or {}).items()}
    details: dict[str, Any] = {"aws_error": code, "status": status}
    if response.get("Reason"):
        details["reason"] = response["Reason"]
    if code == "ResourceNotFoundException":
        return PluginNotFound(
            f"{where} does not exist ({message}); deploy it with `dispatcher deploy`",
            details=details,
        )
    if code in _THROTTLES or status == 429:
        return RateLimited(
            f"{where} is throttled: {message}",
            retry_after=_retry_after(headers.get("retry-after")),
            details=details,
        )
    if code == "RequestTooLargeException" or status == 413:
        return InvalidParams(f"the request is too large for {where}: {message}", details=details)
    if code == "AccessDeniedException" or (status == 403 and code not in _CREDENTIALS_REFUSED):
        action = "invoke" if operation == "Invoke" else f"call {operation} for"
        return Forbidden(f"not allowed to {action} {where}: {message}", details=details)
    if code in _CREDENTIALS_REFUSED or status == 401:
        return Unauthorized(f"AWS refused the credentials for {where}: {message}", details=details)
    if code in _NOT_READY or (status >= 500 and not code.startswith(("KMS", "Invalid", "EFS"))):
        return TargetUnavailable(f"{where} is unavailable: {code}: {message}", details=details)
    return ProviderError(f"{where} failed: {code}: {message}", details=details)


def _retry_after(header: str | None) -> float | None:
    if not header:
        return None
    try:
        return bounded_retry_after(max(0.0, float(header)))
    except ValueError:
        return None
