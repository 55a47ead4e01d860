/**
 * What a call takes and what the gateway describes, shared by the client (client.ts) and
 * the remote plugin (plugin.ts) so that neither imports the other's module for them.
 */

export interface CallOptions {
  /**
   * The call's deadline: sent as `X-Timeout-Ms` and enforced here (DeadlineExceeded).
   * Without one (here or on the client) nothing is sent and the client waits for the
   * gateway's answer: the method's `timeout_ms` rules there, and the gateway answers
   * `deadline_exceeded` itself (504) when it passes. The client's only bound is then
   * CALL_SAFETY_NET_MS (a day and a minute), for a gateway that hangs.
   */
  timeoutMs?: number;
  /**
   * 1-255 printable characters (the gateway's rule; sent as UTF-8), handed to the plugin
   * in the call's context. Anything else is InvalidParams before the call is sent.
   */
  idempotencyKey?: string;
  /** The call's id (1-128 of `A-Z a-z 0-9 . _ : -`); made up here when absent. */
  requestId?: string;
  /** W3C trace context, passed on to the plugin. */
  traceparent?: string;
  /** The plugin version to call; default the highest in the manifest. */
  version?: string;
  /** Abandons the call: it rejects with the signal's reason, as fetch does. */
  signal?: AbortSignal;
}

export interface MethodInfo {
  name: string;
  description: string | null;
  path: string;
  params_schema: Record<string, unknown> | null;
}

export interface PluginInfo {
  id: string;
  version: string;
  description: string | null;
  methods: MethodInfo[];
}

export interface Readiness {
  ready: boolean;
  /** `ready`, or the dispatcher's state while it starts or drains. */
  status: string;
}
