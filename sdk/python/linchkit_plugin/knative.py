"""Serve a plugin as a Knative Function, in the real Knative Functions Python runtime.

The runtime is ``func-python`` (the middleware ``func`` builds Python functions with):
hypercorn, the readiness and liveness routes (``/health/readiness``, ``/health/liveness``),
CloudEvent decoding of every other request, and the Knative container contract
(``LISTEN_ADDRESS``, default ``[::]:8080``). This module adds only the plugin side:

* the request is a CloudEvent (binary or structured mode) whose ``data`` is the dispatcher's
  request envelope (``docs/protocol.md``) and whose ``type`` is ``CALL_EVENT_TYPE``;
* the answer is a CloudEvent of type ``RESPONSE_EVENT_TYPE`` in the same mode as the request,
  whose ``data`` is the response envelope and whose ``id`` is the request's ``id``; its
  HTTP status is 200 for every call the plugin handled (its own errors included) and 400
  for an event that is not a call (another ``type``, data that is not a request
  envelope), as the HTTP binding answers a malformed envelope, so a broker or trigger
  sending the wrong events sees them refused instead of delivered;
* the plugin's ``init``/``start`` run before the runtime reports ready, ``stop``/``destroy``
  at shutdown.

Run it with ``python -m linchkit_plugin.knative package.module:Class [--path DIR]
[--config JSON]``; in a container image that is the entrypoint, and Knative sets ``PORT``.
``func-python`` is imported lazily: ``pip install 'linchkit-dispatcher[knative]'``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from linchkit_plugin.argument_parser import RedactingArgumentParser
from linchkit_plugin.errors import DispatchError, ProviderError
from linchkit_plugin.host import PluginHost
from linchkit_plugin.wire import checked_ok_response, error_response, parse_request

__all__ = [
    "CALL_EVENT_TYPE",
    "RESPONSE_EVENT_TYPE",
    "KnativeFunction",
    "main",
    "serve",
]

#: ``type`` of the CloudEvent the dispatcher sends: one call of a plugin method.
CALL_EVENT_TYPE = "dev.linchkit.plugin.call.v1"
#: ``type`` of the CloudEvent a plugin answers with.
RESPONSE_EVENT_TYPE = "dev.linchkit.plugin.response.v1"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class KnativeFunction:
    """A Knative Function instance (the shape ``func-python`` serves) hosting one plugin.

    ``handle`` receives ``scope["event"]`` already decoded by the runtime and answers with
    ``send(event)`` (structured) or ``send.binary(event)``, as the runtime's
    ``CloudEventSender`` offers.
    """

    def __init__(self, host: PluginHost, *, config: dict[str, Any] | None = None) -> None:
        self.host = host
        self.config = config or {}
        self.source = "/{}/{}".format(
            os.environ.get("K_SERVICE", "plugin"), os.environ.get("K_REVISION", "local")
        )
        self._ready = False

    async def open(self) -> None:
        await self.host.open(self.config)
        self._ready = True

    async def close(self) -> None:
        self._ready = False
        await self.host.close()

    def ready(self) -> tuple[bool, str]:
        return (True, "OK") if self._ready else (False, f"plugin is {self.host.state}")

    def alive(self) -> tuple[bool, str]:
        return True, "OK"

    async def handle(self, scope: Scope, receive: Receive, send: Any) -> None:
        from cloudevents.core.v1.event import CloudEvent

        event = scope["event"]
        headers = dict(scope.get("headers") or ())
        structured = headers.get(b"content-type", b"").startswith(b"application/cloudevents")
        status, answer = await self._answer(event.get_type(), event.get_data())
        reply = CloudEvent(
            attributes={
                "type": RESPONSE_EVENT_TYPE,
                "source": self.source,
                "id": event.get_id(),
                "datacontenttype": "application/json",
            },
            data=answer,
        )
        if structured:
            await send.structured(reply, status)
        else:
            await send.binary(reply, status)

    async def _answer(self, event_type: str, data: Any) -> tuple[int, dict[str, Any]]:
        """The HTTP status and the response envelope for one event."""
        if event_type != CALL_EVENT_TYPE:
            refused = f"this function answers {CALL_EVENT_TYPE} events, not {event_type!r}"
            return 400, error_response(ProviderError(refused))
        if isinstance(data, bytes | str):
            try:
                data = orjson.loads(data)
            except orjson.JSONDecodeError:
                malformed = ProviderError("event data is not a JSON request envelope")
                return 400, error_response(malformed)
        try:
            request = parse_request(data)
        except DispatchError as error:
            return 400, error_response(error)
        deadline_ms = request.deadline_ms
        try:
            result = await self.host.call_with_deadline(
                request.method,
                request.params,
                request.context,
                deadline_ms / 1000 if deadline_ms is not None else None,
                plugin=request.plugin,
            )
        except DispatchError as error:
            return 200, error_response(error)
        return 200, checked_ok_response(result)


def serve(function: KnativeFunction) -> None:
    """Run ``function`` in func-python's CloudEvent runtime until SIGTERM/SIGINT."""
    try:
        from func_python.cloudevent import ASGIApplication
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise SystemExit(
            "serving a Knative function needs func-python: pip install 'linchkit-dispatcher[knative]'"
        ) from None

    class _Application(ASGIApplication):  # type: ignore[misc]
        # func-python calls a function's start()/stop() synchronously; plugin lifecycle hooks
        # are async, so they are awaited here, inside the runtime's own lifespan handling.
        async def on_start(self) -> None:
            await function.open()

        async def on_stop(self) -> None:
            await function.close()
            self.stop_event.set()

    _Application(function).serve()


def main(argv: list[str] | None = None) -> None:
    parser = RedactingArgumentParser(  # refuses without quoting a value
        prog="python -m linchkit_plugin.knative",
        description="Serve a plugin class as a Knative Function (CloudEvents, func-python).",
    )
    parser.add_argument("entrypoint", help="package.module:Class")
    parser.add_argument("--path", default=None, help="Folder to import the plugin from.")
    parser.add_argument(
        "--config",
        default=os.environ.get("LINCHKIT_PLUGIN_CONFIG", "{}"),
        help="JSON object passed to init() (default: $LINCHKIT_PLUGIN_CONFIG, set by deploy).",
    )
    arguments = parser.parse_args(argv)
    config = orjson.loads(arguments.config)
    if not isinstance(config, dict):
        parser.error("--config must be a JSON object")
    if "LISTEN_ADDRESS" not in os.environ and "PORT" in os.environ:
        # The Knative runtime contract gives the port in PORT; func-python reads LISTEN_ADDRESS.
        os.environ["LISTEN_ADDRESS"] = f"0.0.0.0:{os.environ['PORT']}"
    host = PluginHost.load(arguments.entrypoint, arguments.path)
    serve(KnativeFunction(host, config=config))


if __name__ == "__main__":  # pragma: no cover
    main()
