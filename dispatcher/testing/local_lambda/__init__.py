"""A local AWS Lambda: moto's control plane, the real Lambda runtime in Docker, offline.

``LocalLambda`` is an endpoint for AWS SDKs (``endpoint_url``): ``Invoke`` runs the
function's zip in a container of the local runtime image (``aws-lambda-rie`` and
``awslambdaric``) and answers as the Invoke API is documented; every other request goes to
moto's server, the source of truth for functions, versions and aliases. What the
functions print lands in moto's CloudWatch Logs, as on AWS. See ``front`` for the answers
it gives.

Execution environments: one container per concurrent invocation of a function version
(same code and configuration), reused while warm, removed by ``aclose()``. Containers use
the host network (the only one here) on two free loopback ports each.

Not emulated: code from S3, layers, extensions, provisioned concurrency, the async
retry/destination machinery of ``Event`` invocations, response streaming.

Modules, each importing only those above it:

    errors     LocalLambdaError
    engine     DockerEngine: the few Docker Engine API calls needed, over the Unix socket
    function   Function: one function version's configuration, and its environment key
    code       CodeStore: the zips seen going to moto, by CodeSha256, unpacked for mounting
    runtime    Environments: starting, reusing, evicting and removing runtime containers
    control    ControlPlane: the pass-through to moto, and Invoke's cached reads from it
    cloudwatch LogShipper: each container's output into moto's CloudWatch Logs
    front      LocalLambda: the endpoint, the Invoke API semantics, the lifecycle
    server     LocalLambdaServer: moto's server and the front in one lifecycle
               (``dispatcher local-lambda``), create_role, FAKE_CREDENTIALS
"""

from __future__ import annotations

from dispatcher.testing.local_lambda.engine import DockerEngine
from dispatcher.testing.local_lambda.errors import LocalLambdaError
from dispatcher.testing.local_lambda.front import LocalLambda
from dispatcher.testing.local_lambda.runtime import DEFAULT_RUNTIME_IMAGE
from dispatcher.testing.local_lambda.server import (
    FAKE_CREDENTIALS,
    LocalLambdaServer,
    create_role,
)

__all__ = [
    "DEFAULT_RUNTIME_IMAGE",
    "FAKE_CREDENTIALS",
    "DockerEngine",
    "LocalLambda",
    "LocalLambdaError",
    "LocalLambdaServer",
    "create_role",
]
