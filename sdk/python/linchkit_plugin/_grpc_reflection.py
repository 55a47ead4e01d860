"""gRPC server reflection on a plugin's server (``grpcurl list``/``describe``), open like
health: it tells only the schema, which ``proto/plugin.proto`` publishes anyway.

grpcio-reflection serves ``grpc.reflection.v1alpha`` only; the same servicer answers
``grpc.reflection.v1``, whose messages are v1alpha's on the wire. The grpc packages are
imported when reflection is added to a server, not when this module is.
"""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["add_reflection"]

#: grpcio-reflection serves only v1alpha; v1's messages are the same on the wire.
_REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def add_reflection(server: Any) -> None:
    """Serve reflection of the plugin service, health and itself on ``server`` (a
    ``grpc.aio`` server): ``grpc.reflection.v1alpha`` from grpcio-reflection, and the same
    servicer as ``grpc.reflection.v1``, whose messages are v1alpha's on the wire."""
    import grpc
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
    from grpc_reflection.v1alpha._async import ReflectionServicer

    from linchkit_plugin._proto import plugin_pb2

    names = (
        plugin_pb2.DESCRIPTOR.services_by_name["PluginService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )

    class Reflection(ReflectionServicer):  # type: ignore[misc]
        """grpcio-reflection's, resolving a method's full name too (``grpcurl describe
        linchkit.plugin.v1.PluginService.Call``) to its service's file, as other SDKs do."""

        def _file_containing_symbol(self, request: Any, name: str) -> Any:
            service, _, method = name.rpartition(".")
            with contextlib.suppress(KeyError):
                if method in self._pool.FindServiceByName(service).methods_by_name:
                    name = service
            return super()._file_containing_symbol(request, name)

    servicer = Reflection(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_REFLECTION_V1, {"ServerReflectionInfo": v1}),)
    )
