"""``provider: knative``: Knative Services called through the cluster's ingress, and deployed.

One job per module, imported one way (``target`` ← ``activation``, ``cloudevents`` ←
``service`` ← ``deployer`` ← ``provider``):

* ``target`` — ``KnativeTarget`` and its deploy settings, as the manifest states them;
  free of vendor imports.
* ``activation`` — ``classify_failure``: whether a failed attempt can have reached the
  plugin, the rule behind every resend (I/O-free).
* ``cloudevents`` — the request envelope as a CloudEvent (binary or structured) or as it
  is, and the answer back.
* ``service`` — the ``serving.knative.dev/v1`` Service: rendering, validation against the
  CRD schema, and writing it through the Kubernetes API (kubernetes-asyncio).
* ``deployer`` — ``KnativeDeployer``, the deploy seam: plan, apply, remove.
* ``provider`` — ``KnativeProvider``: calls, the transport-level resend, health.

``docs/knative.md`` describes the target, the resend rule and why, and deploying.
"""

from __future__ import annotations

from providers.knative.activation import Failure, classify_failure
from providers.knative.cloudevents import CALL_EVENT_TYPE, RESPONSE_EVENT_TYPE
from providers.knative.deployer import KnativeDeployer
from providers.knative.provider import KnativeProvider, KnativeStats
from providers.knative.target import KnativeCanary, KnativeCluster, KnativeDeploy, KnativeTarget

__all__ = [
    "CALL_EVENT_TYPE",
    "RESPONSE_EVENT_TYPE",
    "Failure",
    "KnativeCanary",
    "KnativeCluster",
    "KnativeDeploy",
    "KnativeDeployer",
    "KnativeProvider",
    "KnativeStats",
    "KnativeTarget",
    "classify_failure",
]
