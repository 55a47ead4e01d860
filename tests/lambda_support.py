"""What the Lambda tests share: the example plugin as a Lambda manifest, a raw handler zip.

Everything runs for real on this machine: moto's server (control plane), the AWS Lambda
runtime (aws-lambda-rie + awslambdaric) in Docker containers behind ``LocalLambda``.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

from tests.conftest import EXAMPLES

ROLE = "arn:aws:iam::123456789012:role/linchkit-plugin"


def echo_lambda_manifest(
    function_name: str = "echo-plugin",
    *,
    greeting: str = "from lambda",
    timeout_s: int = 30,
    path: str = str(EXAMPLES),
    **target: Any,
) -> dict[str, Any]:
    """A manifest document: the example plugin deployed as a Lambda function, via its alias."""
    return {
        "version": 1,
        "plugins": [
            {
                "id": "echo-lambda",
                "version": "1.0.0",
                "config": {"greeting": greeting},
                "target": {
                    "provider": "lambda",
                    "function_name": function_name,
                    "qualifier": "live",
                    "deploy": {
                        "role": ROLE,
                        "entrypoint": "echo_plugin:EchoPlugin",
                        "path": path,
                        "timeout_s": timeout_s,
                    },
                    **target,
                },
                "methods": {"say": {}, "digest": {}, "sleep": {}, "withdraw": {}},
            }
        ],
    }


# A plain Lambda handler that does not speak the envelope: for function errors and
# for what reaches the handler (client context, version).
RAW_HANDLER = """
import time

def handler(event, context):
    if event.get("boom"):
        raise KeyError(event["boom"])
    if event.get("sleep"):
        time.sleep(event["sleep"])
    client_context = context.client_context
    return {
        "event": event,
        "custom": getattr(client_context, "custom", None) if client_context else None,
        "version": context.function_version,
    }
"""


def raw_zip(comment: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        source = RAW_HANDLER + (f"# {comment}\n" if comment else "")
        archive.writestr(zipfile.ZipInfo("raw.py", (1980, 1, 1, 0, 0, 0)), source)
    return buffer.getvalue()
