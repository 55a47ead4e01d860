"""``provider: lambda``: AWS Lambda functions behind the dispatcher envelope.

One job per module:

* ``target``   — ``LambdaTarget`` and ``LambdaDeploySettings``, the manifest side (vendor-free);
* ``client``   — the shared aiobotocore clients (Lambda, CloudWatch Logs); the only module
  importing the AWS SDK, lazily;
* ``errors``   — every botocore exception and function error → ``DispatchError``;
* ``logs``     — the function's output from CloudWatch Logs (``dispatcher logs``);
* ``provider`` — ``LambdaProvider``: invoke, invoke_batch, health, logs, ``deployer()``;
* ``package``  — the function's zip (the plugin and the plugin SDK only) and configuration;
* ``deployer`` — ``LambdaDeployer``: plan, apply, remove against the Lambda API.

Importing this package loads none of aiobotocore, botocore or aiohttp.
"""

from __future__ import annotations

from providers.aws_lambda.deployer import LambdaDeployer
from providers.aws_lambda.provider import LambdaProvider
from providers.aws_lambda.target import LambdaDeploySettings, LambdaTarget

__all__ = ["LambdaDeploySettings", "LambdaDeployer", "LambdaProvider", "LambdaTarget"]
