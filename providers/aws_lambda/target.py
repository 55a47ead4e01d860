"""The manifest side of ``provider: lambda``: the target and its deploy settings.

Vendor-free (pydantic only), so loading a manifest never imports the AWS SDK.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from providers._headers import checked_base_url, http_url_parts, refuse_aws_credentials
from providers.target import Destination, ManifestPath, StrictModel, TargetConfig

__all__ = ["LambdaDeploySettings", "LambdaTarget"]

_FUNCTION_NAME = (
    r"^(arn:aws[a-zA-Z-]*:lambda:[a-z0-9-]+:\d{12}:function:)?[a-zA-Z0-9_-]{1,140}(:[\w$-]+)?$"
)


class LambdaDeploySettings(StrictModel):
    """How ``dispatcher deploy`` builds and configures the function behind a target."""

    secret_fields = frozenset({"environment"})

    role: str = Field(
        pattern=r"^arn:aws[a-zA-Z-]*:iam::\d{12}:role/.+$",
        description="Execution role ARN (infra/lambda/template.yaml creates a least-privilege one).",
    )
    entrypoint: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", examples=["echo:EchoPlugin"])
    path: ManifestPath | None = Field(
        default=None, description="Folder holding the plugin's modules, relative to the manifest."
    )
    requirements: list[str] = Field(
        default_factory=list,
        description="Extra installed distributions to vendor into the zip (the SDK's own are always included).",
    )
    runtime: Literal["python3.11"] = "python3.11"
    memory_mb: int = Field(default=256, ge=128, le=10240)
    timeout_s: int = Field(default=30, ge=1, le=900)
    alias: str = Field(default="live", pattern=r"^[a-zA-Z0-9_-]*[a-zA-Z_-][a-zA-Z0-9_-]*$")
    environment: dict[str, str] = Field(default_factory=dict)
    architecture: Literal["x86_64"] = "x86_64"


class LambdaTarget(TargetConfig):
    """``provider: lambda``: an AWS Lambda function answering the dispatcher envelope."""

    provider: Literal["lambda"]
    function_name: str = Field(pattern=_FUNCTION_NAME, description="Name, ARN or partial ARN.")
    qualifier: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9$_-]{1,128}$",  # Lambda's own pattern of a version or an alias
        description="A version number or an alias.",
    )
    region: str | None = Field(
        default=None,
        pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$",
        description="AWS region; unset: the standard chain (AWS_REGION, profile).",
    )
    endpoint_url: str | None = Field(
        default=None, description="Another endpoint (moto, LocalStack, a local Invoke front)."
    )
    invocation_type: Literal["RequestResponse", "Event"] = "RequestResponse"
    log_tail: bool = Field(default=False, description="LogType=Tail: log the function's output.")
    envelope: bool = Field(
        default=True,
        description="The function speaks the envelope; false: params are the event, the payload the result.",
    )
    batch: bool = Field(
        default=True, description="Send batches in one invocation (batch envelope)."
    )
    deploy: LambdaDeploySettings | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_is_http(cls, endpoint_url: str | None) -> str | None:
        if endpoint_url is None:
            return None
        checked_base_url(endpoint_url)
        # Credentials first: they are the likelier mistake, and the message says why.
        refuse_aws_credentials(urlsplit(endpoint_url), "endpoint_url")
        http_url_parts(endpoint_url, "endpoint_url")
        return endpoint_url

    def destinations(self) -> tuple[Destination, ...]:
        """The endpoint, checked when the manifest loads. Not after resolution: botocore
        resolves and connects on its own (``providers.egress``)."""
        if self.endpoint_url is None:
            return ()
        return (Destination.of_url("endpoint_url", self.endpoint_url),)

    def describe(self) -> str:
        where = f"{self.function_name}:{self.qualifier}" if self.qualifier else self.function_name
        region = f" ({self.region})" if self.region else ""
        event = " [Event]" if self.invocation_type == "Event" else ""
        return f"lambda {where}{region}{event}"
