/** LinchKit dispatcher host client: remote plugins through the gateway (`dispatcher serve`). */

export {
  CALL_SAFETY_NET_MS,
  CONNECT_STAGE,
  DEADLINE_MARGIN_MS,
  DEFAULT_MAX_CONNECTIONS,
  DEFAULT_TIMEOUT_MS,
  GatewayClient,
  IN_FLIGHT_STAGE,
  JOB_NOT_FINISHED,
  MAX_IDEMPOTENCY_KEY_LENGTH,
} from './client';
export type {
  CallOptions,
  Credential,
  GatewayClientOptions,
  JobOptions,
  JobRecord,
  MethodInfo,
  PluginInfo,
  Readiness,
  SubmitOptions,
} from './client';
export { ANY_EVENT, RemotePlugin } from './plugin';
export type { ErrorHandler, EventHandler, GapHandler, HealthStatus, PluginGateway, PluginState, RemotePluginService } from './plugin';
export { EventStream } from './events';
export type { EventFilter, EventStreamOptions, Gap, PluginEvent, ResumePoint } from './events';
export {
  CircuitOpen,
  DeadlineExceeded,
  DispatchError,
  Forbidden,
  InvalidParams,
  MethodNotFound,
  Overloaded,
  PluginError,
  PluginNotFound,
  ProviderError,
  RateLimited,
  ShuttingDown,
  TargetUnavailable,
  Unauthorized,
  errorFromWire,
} from './errors';
export type { DispatchErrorOptions, WireError } from './errors';
