"""The one module that imports the AWS SDK (aiobotocore, botocore), and only when used.

``LambdaClients`` keeps one aiobotocore client per (service, region, endpoint) for the life
of a started provider: ``lambda`` for the provider's calls and its deployer, ``logs``
(CloudWatch Logs) for ``dispatcher logs``, with the same region, endpoint and credentials. Importing this
module is free: ``open()`` imports aiobotocore, so loading a manifest (which imports every
target model) never pays for it, and a host without the ``lambda`` extra fails only when
it starts a Lambda provider, with a message saying what to install.

botocore's own retries are off: the dispatcher's retry policy decides, and a silent SDK
retry of a throttle would spend the caller's deadline behind its back.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
from types import ModuleType
from typing import Any, Literal

from linchkit_plugin.errors import ProviderError
from providers.aws_lambda.target import LambdaTarget

__all__ = ["LambdaClients", "Service", "aws_error_code", "botocore_exceptions"]

#: The AWS services the provider talks to: Lambda, and CloudWatch Logs for its output.
Service = Literal["lambda", "logs"]

#: Longest wait for an Invoke's answer: the longest a Lambda can run (15 min), and more;
#: each call is bounded by its own deadline besides.
INVOKE_READ_TIMEOUT = 905.0
#: Longest wait for a control-plane (deploy's) or CloudWatch Logs answer: AWS answers
#: those in well under a second, so 30 s of silence is a stalled server or a broken
#: proxy, and waiting the 15 minutes an Invoke may take would hang ``deploy``/``logs``.
CONTROL_PLANE_READ_TIMEOUT = 30.0


def botocore_exceptions() -> ModuleType:
    """``botocore.exceptions``, imported on first use."""
    try:
        return importlib.import_module("botocore.exceptions")
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise _missing() from None


def aws_error_code(error: BaseException) -> str | None:
    """The AWS error code of a botocore ``ClientError`` (``ResourceNotFoundException`` …)."""
    if not isinstance(error, botocore_exceptions().ClientError):
        return None
    return str(error.response.get("Error", {}).get("Code", "Unknown"))


class LambdaClients:
    """One shared client per (service, region, endpoint), opened on first use."""

    def __init__(self, *, max_connections: int = 64, connect_timeout: float = 5.0) -> None:
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._session: Any = None
        self._clients: dict[tuple[Service, str | None, str | None, bool], Any] = {}
        self._exits = contextlib.AsyncExitStack()
        self._opening = asyncio.Lock()

    def __repr__(self) -> str:
        regions = sorted(
            f"{service}:{region or 'default'}@{url or 'aws'}{'' if invoke else ' (control)'}"
            for service, region, url, invoke in self._clients
        )
        return f"clients={regions}"

    def open(self) -> None:
        try:
            from aiobotocore.session import get_session
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise _missing() from None
        self._session = get_session()

    async def aclose(self) -> None:
        self._clients.clear()
        exits, self._exits = self._exits, contextlib.AsyncExitStack()
        await exits.aclose()

    async def get(
        self, target: LambdaTarget, service: Service = "lambda", *, control_plane: bool = False
    ) -> Any:
        """The ``service`` client for the target's region and endpoint; concurrent first
        calls share it. A local Lambda's endpoint passes ``logs`` requests to moto.

        Only Lambda's Invoke waits long for an answer (``INVOKE_READ_TIMEOUT``): a
        ``control_plane`` client (deploy's calls) and every ``logs`` client give up
        after ``CONTROL_PLANE_READ_TIMEOUT`` of silence."""
        invoke = service == "lambda" and not control_plane
        key = (service, target.region, target.endpoint_url, invoke)
        client = self._clients.get(key)
        if client is not None:
            return client
        async with self._opening:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = await self._create(target, service, invoke)
            return client

    async def _create(self, target: LambdaTarget, service: Service, invoke: bool) -> Any:
        if self._session is None:
            raise ProviderError(
                "the lambda provider is not started (use the Dispatcher as a context manager)"
            )
        from aiobotocore.config import AioConfig

        config = AioConfig(
            connect_timeout=self._connect_timeout,
            read_timeout=INVOKE_READ_TIMEOUT if invoke else CONTROL_PLANE_READ_TIMEOUT,
            # ``total_max_attempts``: botocore's ``max_attempts`` counts the retries after
            # the first attempt, so ``max_attempts: 1`` still retried once.
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=self._max_connections,
            tcp_keepalive=True,
        )
        try:
            return await self._exits.enter_async_context(
                self._session.create_client(
                    service,
                    region_name=target.region,
                    endpoint_url=target.endpoint_url,
                    config=config,
                )
            )
        except botocore_exceptions().BotoCoreError as error:
            raise ProviderError(
                f"cannot make a {service} client for {target.describe()}: {error}"
            ) from error
        except ValueError as error:  # botocore's "Invalid endpoint: …", a URL without scheme
            raise ProviderError(
                f"cannot make a {service} client for {target.describe()}: {error}; set "
                f"{_endpoint_source(target, service)} to a well-formed URL starting with "
                "http:// or https://"
            ) from error


#: The variable botocore reads a service's own endpoint from, before ``AWS_ENDPOINT_URL``.
_ENDPOINT_VARIABLES: dict[Service, str] = {
    "lambda": "AWS_ENDPOINT_URL_LAMBDA",
    "logs": "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS",
}


def _endpoint_source(target: LambdaTarget, service: Service) -> str:
    """Where the endpoint botocore refused came from, to name what to fix."""
    if target.endpoint_url:
        return "the target's endpoint_url"
    own = _ENDPOINT_VARIABLES[service]
    return own if os.environ.get(own) else "AWS_ENDPOINT_URL"


def _missing() -> ProviderError:
    return ProviderError(
        "the lambda provider needs aiobotocore: pip install 'linchkit-dispatcher[lambda]'"
    )
