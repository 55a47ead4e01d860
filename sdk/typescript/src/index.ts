/** The LinchKit plugin SDK for TypeScript: see plugin.ts for how a plugin is written. */
export { Plugin } from './plugin';
export type { CallContext, EventHandler, LifecycleHook, MethodInfo, MethodOptions, PluginOptions, StreamingMethod, UnaryMethod } from './plugin';
export { DeadlineExceeded, InvalidParams, MethodNotFound, PluginError, ProviderError, toWireError } from './errors';
export type { PluginErrorOptions, WireError } from './errors';
export { Params, expectObject, isObject } from './params';
export type { JsonObject } from './params';
export { Logger } from './log';
export type { Level, Sink } from './log';
export { serve, STOP_GRACE_MS, STOP_HOOKS_MS } from './serve';
export type { ServeOptions } from './serve';
export { PluginServer, PROTOCOL_VERSION, SERVICE_NAME } from './server';
export * as handshake from './handshake';
export { BearerToken, TOKEN_ENV, TOKEN_FILE_ENV, tokenInterceptor } from './auth';
export { GOAWAY_GRACE, Refused, Session, WebSocketPluginServer, dial, serveWebSocket, STREAM_WINDOW } from './websocket';
export type { DialOptions } from './websocket';
export { Tracing, tracesEndpoint, OTLP_ENDPOINT_ENV, OTLP_TRACES_ENDPOINT_ENV } from './tracing';
export type { CallSpan } from './tracing';
