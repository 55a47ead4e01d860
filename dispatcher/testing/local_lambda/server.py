"""A whole local Lambda in one object: moto's server behind a ``LocalLambda`` front.

``LocalLambdaServer`` is what ``dispatcher local-lambda`` runs (the way ``sam local
start-lambda`` does) and what a script or a test can start on its own: moto's
``ThreadedMotoServer`` on a free loopback port as the control plane, and the front on
``port``, the one endpoint clients are given. IAM requests pass through the front to moto,
so ``create_role`` works on either URL.

moto keeps everything in memory: functions, versions, aliases and roles are gone once the
server stops. Starting it needs ``moto[server]``, a Docker engine and the runtime image;
each missing piece is a ``LocalLambdaError`` saying what to install or run.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dispatcher.testing.local_lambda.errors import LocalLambdaError
from dispatcher.testing.local_lambda.front import LocalLambda
from dispatcher.testing.local_lambda.runtime import DEFAULT_RUNTIME_IMAGE

__all__ = ["ACCOUNT", "FAKE_CREDENTIALS", "LAMBDA_TRUST", "LocalLambdaServer", "create_role"]

#: moto accepts any credentials; these keep the standard chain from finding real ones.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
ACCOUNT = "123456789012"  # moto's default account: execution roles must be in it
LAMBDA_TRUST = (
    '{"Version":"2012-10-17","Statement":[{"Effect":"Allow",'
    '"Principal":{"Service":"lambda.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
)


async def create_role(url: str, name: str, *, region: str = "us-east-1") -> str:
    """Create (or find) the IAM role ``name`` in moto; returns its ARN.

    moto's CreateFunction refuses a role that does not exist, as Lambda does. A plain IAM
    Query request: the vendor SDK stays in ``providers/aws_lambda/client.py``.
    """
    import aiohttp

    form = {
        "Action": "CreateRole",
        "Version": "2010-05-08",
        "RoleName": name,
        "AssumeRolePolicyDocument": LAMBDA_TRUST,
    }
    headers = {
        "Authorization": (
            f"AWS4-HMAC-SHA256 Credential=testing/20240101/{region}/iam/aws4_request, "
            "SignedHeaders=host, Signature=0"
        )
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/", data=form, headers=headers) as answer,
    ):
        text = await answer.text()
        if answer.status != 200 and "EntityAlreadyExists" not in text:
            raise LocalLambdaError(f"moto did not create role {name}: {answer.status} {text[:200]}")
    return f"arn:aws:iam::{ACCOUNT}:role/{name}"


class LocalLambdaServer:
    """moto and the front, started and stopped together; ``url`` is the endpoint.

    ``aclose()`` removes every runtime container the front started and stops moto.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        image: str = DEFAULT_RUNTIME_IMAGE,
        max_environments: int = 8,
    ) -> None:
        self.host = host
        self.port = port
        self.image = image
        self.max_environments = max_environments
        self._moto: Any = None
        self._front: LocalLambda | None = None
        self.control_plane_url: str | None = None

    def __repr__(self) -> str:
        return (
            f"<LocalLambdaServer moto={self.control_plane_url or 'stopped'} front={self._front!r}>"
        )

    @property
    def url(self) -> str:
        if self._front is None:
            raise LocalLambdaError("the local Lambda is not started")
        return self._front.url

    @property
    def front(self) -> LocalLambda:
        if self._front is None:
            raise LocalLambdaError("the local Lambda is not started")
        return self._front

    async def __aenter__(self) -> LocalLambdaServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise LocalLambdaError(
                "the local Lambda's control plane is moto's server: pip install 'moto[server]'"
            ) from None
        moto = ThreadedMotoServer(ip_address=self.host, port=0, verbose=False)
        await asyncio.to_thread(moto.start)
        self._moto = moto
        host, port = moto.get_host_and_port()
        self.control_plane_url = f"http://{host}:{port}"
        front = LocalLambda(
            self.control_plane_url,
            image=self.image,
            host=self.host,
            port=self.port,
            max_environments=self.max_environments,
        )
        try:
            await front.start()
        except BaseException:
            await self.aclose()
            raise
        self._front = front

    async def create_role(self, name: str) -> str:
        """Create the execution role ``name`` deploys will name; returns its ARN."""
        if self.control_plane_url is None:
            raise LocalLambdaError("the local Lambda is not started")
        return await create_role(self.control_plane_url, name)

    async def aclose(self) -> None:
        front, self._front = self._front, None
        if front is not None:
            await front.aclose()
        moto, self._moto = self._moto, None
        if moto is not None:
            await asyncio.to_thread(moto.stop)
        self.control_plane_url = None
