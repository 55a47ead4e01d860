"""Local containers: a plugin image run by the local Docker engine, sandboxed, on demand.

A ``provider: docker`` target is an image plus how to speak to it (``docs/docker.md``).
One job per module:

    target.py      the manifest's models; no engine client, so a manifest loads without it
    provider.py    DockerProvider: pools of containers per plugin target, calls, errors
    pool.py        the bookkeeping of one pool: its containers and the calls waiting
    containers.py  starting, watching, replacing and removing containers
    channel.py     how a call reaches a container (the HTTP envelope; the seam for gRPC),
                   over its Unix socket pinned (``providers._socket_pin``): never a
                   symlink or a swapped file
    sandbox.py     the Engine API create body: the sandbox, in the API's own words
    engine.py      the engine through aiodocker (its only importer), ownership and orphans
    image.py       ``dispatcher deploy``: building the image, as a ``Deployer``

aiodocker (the ``docker`` extra) is imported when the provider starts, never here, so
the manifest loader can read ``DockerProvider.target_model`` without it.
"""

from __future__ import annotations

from providers.docker.engine import LABEL_OWNER
from providers.docker.image import DockerDeployer
from providers.docker.provider import DockerProvider
from providers.docker.target import (
    BASE_IMAGE,
    DockerBuild,
    DockerLimits,
    DockerSandbox,
    DockerTarget,
)

__all__ = [
    "BASE_IMAGE",
    "LABEL_OWNER",
    "DockerBuild",
    "DockerDeployer",
    "DockerLimits",
    "DockerProvider",
    "DockerSandbox",
    "DockerTarget",
]
