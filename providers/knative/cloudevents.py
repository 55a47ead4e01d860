"""The wire of a Knative call: the request envelope as a CloudEvent (or as it is), and back.

``mode: envelope`` POSTs the dispatcher's JSON envelope (a function served by
``dispatcher-plugin serve``); ``binary`` and ``structured`` send it as the ``data`` of a
CloudEvent (``ce-*`` headers, or ``application/cloudevents+json``), which is what a Knative
Function in the ``func-python`` runtime accepts (``linchkit_plugin.knative``). The event
``id`` is the request id and stays the same on every attempt, so a receiver may deduplicate
on ``(source, id)`` as the CloudEvents spec allows. The cloudevents SDK is imported on the
first CloudEvents call, not when this module loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from linchkit_plugin.errors import ProviderError
from linchkit_plugin.wire import decode_response, encode_json
from providers.invocation import Invocation
from providers.knative.target import KnativeTarget

__all__ = [
    "CALL_EVENT_TYPE",
    "EVENT_SOURCE",
    "RESPONSE_EVENT_TYPE",
    "Answer",
    "decode_answer",
    "encode_request",
    "read_event",
]

# The same strings as linchkit_plugin.knative, which the plugin side imports; repeated here so
# loading this module does not import the SDK's func-python side.
CALL_EVENT_TYPE = "dev.linchkit.plugin.call.v1"
RESPONSE_EVENT_TYPE = "dev.linchkit.plugin.response.v1"
EVENT_SOURCE = "/linchkit/dispatcher"


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer as read: status, headers with lower-case names, the whole body."""

    status: int
    headers: dict[str, str]
    body: bytes


def encode_request(target: KnativeTarget, invocation: Invocation) -> tuple[dict[str, str], bytes]:
    """Headers and body of one attempt; params JSON cannot carry raise ``InvalidParams``."""
    envelope = invocation.request_wire()
    # encode_json first in every mode: it refuses what JSON cannot carry, where the
    # cloudevents SDK's encoder would fall back to str() and send a corrupt payload.
    body = encode_json(envelope)
    if target.mode == "envelope":
        return {"Content-Type": "application/json"}, body
    from cloudevents.core.bindings.http import to_binary_event, to_structured_event
    from cloudevents.core.v1.event import CloudEvent

    attributes: dict[str, Any] = {
        "type": CALL_EVENT_TYPE,
        "source": EVENT_SOURCE,
        "id": invocation.request_id,
        "subject": f"{invocation.plugin}.{invocation.method}",
        "datacontenttype": "application/json",
    }
    if invocation.traceparent is not None:
        # The CloudEvents distributed-tracing extension carries W3C trace context.
        attributes["traceparent"] = invocation.traceparent
    event = CloudEvent(attributes=attributes, data=envelope)
    message = to_binary_event(event) if target.mode == "binary" else to_structured_event(event)
    return dict(message.headers), message.body


def decode_answer(target: KnativeTarget, answer: Answer) -> Any:
    """The result of a 200 answer, or raise the error its response envelope carries."""
    if target.mode == "envelope":
        try:
            payload = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            raise ProviderError(
                f"{target.host} answered a body that is not JSON: {answer.body[:80]!r}"
            ) from None
        return decode_response(payload)
    event_type, data = read_event(target, answer)
    if event_type != RESPONSE_EVENT_TYPE:
        raise ProviderError(
            f"{target.host} answered a {event_type!r} event, expected {RESPONSE_EVENT_TYPE}"
        )
    return decode_response(data)


def read_event(target: KnativeTarget, answer: Answer) -> tuple[str, Any]:
    """The type and data of the CloudEvent ``answer`` carries."""
    from cloudevents.core.bindings.http import HTTPMessage, from_http_event
    from cloudevents.core.exceptions import BaseCloudEventException

    try:
        event = from_http_event(HTTPMessage(headers=answer.headers, body=answer.body))
    except (BaseCloudEventException, ValueError) as error:
        raise ProviderError(
            f"{target.host} answered something that is not a CloudEvent: {error}"
        ) from None
    return event.get_type(), event.get_data()
