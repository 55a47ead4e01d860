"""Who may call a gRPC plugin service: the bearer token checked on every RPC but health's
and reflection's (``linchkit_plugin.grpc_server``, service mode).

A caller without the right token is answered ``UNAUTHENTICATED`` before the servicer runs,
and learns nothing of what it sent. grpcio is imported when the interceptor is built, so
importing this module costs nothing to a plugin that never serves gRPC.
"""

from __future__ import annotations

from typing import Any

from linchkit_plugin.auth import BearerToken

__all__ = ["token_interceptor"]

#: What a caller without the right token learns: never what it sent.
_UNAUTHENTICATED = "missing or wrong bearer token"
#: Open without the token: health (orchestrators probe it without credentials) and server
#: reflection (it tells only the schema, which proto/plugin.proto publishes anyway).
_OPEN_SERVICE_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)


def token_interceptor(token: BearerToken) -> Any:
    """A ``grpc.aio.ServerInterceptor`` refusing every RPC but health's and reflection's
    without ``token``."""
    import grpc
    import grpc.aio

    async def refuse(request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

    refusals = {
        (False, False): grpc.unary_unary_rpc_method_handler(refuse),
        (False, True): grpc.unary_stream_rpc_method_handler(refuse),
        (True, False): grpc.stream_unary_rpc_method_handler(refuse),
        (True, True): grpc.stream_stream_rpc_method_handler(refuse),
    }

    class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            handler = await continuation(details)
            if handler is None or details.method.startswith(_OPEN_SERVICE_PREFIXES):
                return handler
            values = [
                value for key, value in details.invocation_metadata or () if key == "authorization"
            ]
            presented = values[0] if len(values) == 1 else None
            if isinstance(presented, str):
                presented = presented.encode("utf-8", "replace")
            if token.admits(presented):
                return handler
            return refusals[(handler.request_streaming, handler.response_streaming)]

    return TokenInterceptor()
