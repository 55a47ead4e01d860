/**
 * The gRPC binding of a `Plugin`: linchkit.plugin.v1.PluginService plus grpc.health.v1 and
 * server reflection, on a @grpc/grpc-js server. Plugin failures travel in CallReply.error;
 * gRPC status codes are kept for protocol failures (a malformed request, a failing
 * lifecycle hook).
 */
import { parse } from 'lossless-json';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';
import type * as protobuf from 'protobufjs';
import * as descriptor from 'protobufjs/ext/descriptor';
import { HealthImplementation, protoPath as healthProtoPath } from 'grpc-health-check';
import { type BearerToken, tokenInterceptor } from './auth';
import { DeadlineExceeded, InvalidParams, ProviderError, toWireError, type WireError } from './errors';
import { AttachedHosts, BadHostId, hostOf, MAX_HOSTS } from './hosts';
import { log, shown } from './log';
import { isObject, type JsonObject } from './params';
import type { CallContext, Plugin } from './plugin';
import type { CallSpan, Tracing } from './tracing';
import { encodeJson, sendableError, unusable } from './wirejson';

export const PROTOCOL_VERSION = 1;
export const SERVICE_NAME = 'linchkit.plugin.v1.PluginService';
/** The most calls one CallBatch may carry: what the dispatcher's batcher sends at most. */
export const MAX_BATCH_CALLS = 10_000;
/** The most events an Events stream holds while its host does not read them (docs/protocol.md). */
export const EVENTS_PER_STREAM = 1024;
/** setTimeout's longest delay: a longer one fires after 1 ms. */
/** The largest gRPC message the plugin takes or sends (Call, CallBatch, CallStream items,
 * Events): 64 MiB, the dispatcher's own limit (its channel's grpc.max_receive_message_length
 * and grpc.max_send_message_length), not grpc-js's default 4 MiB receive. A larger message is
 * refused with RESOURCE_EXHAUSTED. */
export const MAX_GRPC_MESSAGE_BYTES = 64 * 1024 * 1024;
const MAX_TIMER_MS = 2 ** 31 - 1;

/** Where plugin.proto is: next to the compiled SDK (dist/proto, which build.sh and `npm run
 * build` copy there and the package ships), or the repository's proto/ (a checkout's dist/). */
export function protoPath(): string {
  const candidates = [
    process.env.LINCHKIT_PLUGIN_PROTO,
    path.resolve(__dirname, 'proto/plugin.proto'),
    path.resolve(__dirname, '../../../proto/plugin.proto'),
  ];
  for (const candidate of candidates) if (candidate && existsSync(candidate)) return candidate;
  throw new Error(`plugin.proto not found; looked in ${candidates.filter(Boolean).join(', ')}`);
}

let cachedDefinition: grpc.ServiceDefinition | undefined;

/** The PluginService definition, loaded from plugin.proto once. */
export function serviceDefinition(): grpc.ServiceDefinition {
  if (cachedDefinition === undefined) {
    const packageDefinition = protoLoader.loadSync(protoPath(), {
      keepCase: true,
      longs: Number,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    const loaded = grpc.loadPackageDefinition(packageDefinition) as any;
    cachedDefinition = loaded.linchkit.plugin.v1.PluginService.service as grpc.ServiceDefinition;
  }
  return cachedDefinition;
}

let cachedReflection: ReflectionService | undefined;

/** Server reflection (v1 and v1alpha) of the plugin service and health, built once. */
function reflectionService(): ReflectionService {
  if (cachedReflection === undefined) {
    // keepCase: the descriptors name fields as the proto does (params_json, not paramsJson).
    const definition = protoLoader.loadSync([protoPath(), healthProtoPath], { keepCase: true });
    const fixed: protoLoader.PackageDefinition = {};
    for (const [name, entry] of Object.entries(definition)) {
      const files = (entry as { fileDescriptorProtos?: Buffer[] }).fileDescriptorProtos;
      fixed[name] = Array.isArray(files)
        ? ({ ...entry, fileDescriptorProtos: files.map(withProtocMapEntryNames) } as typeof entry)
        : entry;
    }
    cachedReflection = new ReflectionService(fixed);
  }
  return cachedReflection;
}

/**
 * The encoded FileDescriptorProto `file` with each map field's entry type named as protoc
 * names it (`statuses` → `StatusesEntry`). protobufjs names it after the field
 * (`Statuses`), and Go's protobuf, under grpcurl, refuses such a file (health.proto's
 * `HealthListResponse.statuses`).
 */
function withProtocMapEntryNames(file: Buffer): Buffer {
  const proto = descriptor.FileDescriptorProto.decode(file) as unknown as descriptor.IFileDescriptorProto;
  let changed = false;
  const visit = (messages: descriptor.IDescriptorProto[] | undefined): void => {
    for (const message of messages ?? []) {
      for (const nested of message.nestedType ?? []) {
        if (!nested.options?.mapEntry || !nested.name) continue;
        const old = nested.name;
        const field = (message.field ?? []).find((f) => f.typeName?.split('.').pop() === old);
        if (!field?.name) continue;
        const name = field.name.split('_').map((w) => w.charAt(0).toUpperCase() + w.slice(1)).join('') + 'Entry';
        if (name === old) continue;
        nested.name = name;
        field.typeName = field.typeName!.slice(0, field.typeName!.length - old.length) + name;
        changed = true;
      }
      visit(message.nestedType);
    }
  };
  visit(proto.messageType);
  if (!changed) return file;
  return Buffer.from(descriptor.FileDescriptorProto.encode(proto as unknown as protobuf.Message).finish());
}

// The messages as @grpc/proto-loader gives them (keepCase, defaults).
interface CallContextMessage {
  request_id: string;
  deadline_ms: number;
  caller: string;
  traceparent: string;
  idempotency_key: string;
}
export interface CallRequestMessage {
  v: number;
  plugin: string;
  method: string;
  params_json: Buffer;
  context: CallContextMessage | null;
}
interface ErrorMessage {
  type: string;
  message: string;
  retryable: boolean;
  details_json: Buffer;
  retry_after: number;
}
export interface CallReplyMessage {
  ok: boolean;
  result_json?: Buffer;
  error?: ErrorMessage;
}

export function errorMessage(error: WireError): ErrorMessage {
  const wire = sendableError(error);
  return {
    type: wire.type,
    message: wire.message,
    retryable: wire.retryable,
    details_json: wire.details === undefined ? Buffer.alloc(0) : encodeJson(wire.details),
    retry_after: wire.retryAfter ?? 0,
  };
}

/** The reply for anything a method threw. */
export function errorReply(thrown: unknown): CallReplyMessage {
  return { ok: false, error: errorMessage(toWireError(thrown)) };
}

// JSON through lossless-json, not JSON.parse: the protocol carries JSON bytes so that an
// integer above 2^53 (an int64 id) survives, and JSON.parse would round it to a double.
// Integers that fit a double stay numbers; larger ones become BigInt and are written back exactly.
function parseNumber(text: string): number | bigint {
  const value = Number(text);
  return Number.isSafeInteger(value) || !/^-?\d+$/.test(text) ? value : BigInt(text);
}

/** JSON bytes to a value; empty bytes are null. */
export function decodeJson(bytes: Buffer | Uint8Array | undefined, what: string, maxDepth?: number): unknown {
  if (bytes === undefined || bytes.length === 0) return null;
  const buffer = Buffer.from(bytes);
  const why = unusable(buffer, maxDepth);
  if (why !== undefined) throw new InvalidParams(`${what} ${why}`);
  try {
    return parse(buffer.toString('utf8'), null, parseNumber);
  } catch (error) {
    throw new InvalidParams(`${what} is not valid JSON: ${(error as Error).message}`);
  }
}

function metadataValue(metadata: grpc.Metadata, key: string): string {
  const values = metadata.get(key);
  return values.length > 0 ? String(values[0]) : '';
}

/** What every kind of server call has. */
type SurfaceCall = grpc.ServerUnaryCall<unknown, unknown> | grpc.ServerWritableStream<unknown, unknown>;
/** A lifecycle hook's name, as a failed one is named in its status. */
type HookName = 'init' | 'start' | 'stop' | 'destroy';

/** A call's context and the means to end it; `finish()` releases its timer. */
interface LiveContext {
  ctx: CallContext;
  finish(): void;
  /** Rejects when the call is over (deadline or cancellation); never resolves. */
  over: Promise<never>;
}

function liveContext(method: string, request: CallRequestMessage, call: SurfaceCall): LiveContext {
  const message = request.context;
  const now = Date.now();
  const deadlines: number[] = [];
  if (message && message.deadline_ms > 0) deadlines.push(now + Number(message.deadline_ms));
  const grpcDeadline = call.getDeadline();
  const grpcDeadlineMs = grpcDeadline instanceof Date ? grpcDeadline.getTime() : Number(grpcDeadline);
  if (Number.isFinite(grpcDeadlineMs)) deadlines.push(grpcDeadlineMs);
  const deadline = deadlines.length > 0 ? Math.min(...deadlines) : undefined;

  const controller = new AbortController();
  let timer: NodeJS.Timeout | undefined;
  if (deadline !== undefined) {
    // setTimeout fires after 1 ms for a delay past 2^31-1 ms (24.8 days): a deadline_ms of
    // 2^63-1, or a month, ended the call at once. Wait in steps it can hold instead.
    const arm = (): void => {
      const left = deadline - Date.now();
      timer =
        left > MAX_TIMER_MS
          ? setTimeout(arm, MAX_TIMER_MS)
          : setTimeout(
              () => controller.abort(new DeadlineExceeded(`${method} did not finish before its deadline`)),
              Math.max(0, left),
            );
    };
    arm();
  }
  const onCancelled = (): void => controller.abort(new DeadlineExceeded(`${method} was cancelled by the host`));
  call.on('cancelled', onCancelled);
  const over = new Promise<never>((_, reject) => {
    controller.signal.addEventListener('abort', () => reject(controller.signal.reason), { once: true });
  });
  over.catch(() => undefined); // observed by whoever races it; never an unhandled rejection

  const ctx: CallContext = {
    method,
    requestId: message?.request_id || metadataValue(call.metadata, 'x-request-id'),
    caller: message?.caller || metadataValue(call.metadata, 'x-caller'),
    traceparent: message?.traceparent || metadataValue(call.metadata, 'traceparent'),
    idempotencyKey: message?.idempotency_key ?? '',
    deadline,
    signal: controller.signal,
    remainingMs: () => (deadline === undefined ? undefined : Math.max(0, deadline - Date.now())),
    sleep: (ms: number) =>
      new Promise<void>((resolve, reject) => {
        if (controller.signal.aborted) return reject(controller.signal.reason);
        const onAbort = (): void => {
          clearTimeout(sleeper);
          reject(controller.signal.reason);
        };
        const sleeper = setTimeout(() => {
          controller.signal.removeEventListener('abort', onAbort);
          resolve();
        }, ms);
        controller.signal.addEventListener('abort', onAbort, { once: true });
      }),
  };
  return {
    ctx,
    over,
    finish: () => {
      if (timer !== undefined) clearTimeout(timer);
      call.removeListener('cancelled', onCancelled);
    },
  };
}

/** Protocol checks common to Call, CallBatch and CallStream; throws a PluginError. */
function checkRequest(request: CallRequestMessage): unknown {
  if (request.v !== 0 && request.v !== PROTOCOL_VERSION) {
    throw new ProviderError(`envelope version ${request.v} is not supported; this plugin speaks ${PROTOCOL_VERSION}`);
  }
  return decodeJson(request.params_json, 'params_json');
}

export interface PluginServerOptions {
  /** Health answers SERVING before Start (service mode). */
  servingFromStart: boolean;
  /** Every RPC but health's and reflection's must carry `authorization: Bearer <token>`. */
  token?: BearerToken;
  /** Each call runs in a span continuing its traceparent (tracing.ts); undefined: untraced. */
  tracing?: Tracing;
}

/** A grpc-js Server carrying the plugin's service, the health service and server reflection
 * (open like health: it tells only the schema, which proto/plugin.proto publishes). */
export class PluginServer {
  readonly server: grpc.Server;
  readonly health: HealthImplementation;
  private readonly plugin: Plugin;
  private readonly tracing: Tracing | undefined;
  /** The hosts attached now: the last to leave runs the stop and destroy hooks. */
  private readonly hosts = new AttachedHosts();
  /** What ends each open Events stream: they never end by themselves, so `shutdown` ends them. */
  private readonly eventStreams = new Set<() => void>();

  constructor(plugin: Plugin, options: PluginServerOptions) {
    this.plugin = plugin;
    this.tracing = options.tracing;
    this.server = new grpc.Server({
      'grpc.max_receive_message_length': MAX_GRPC_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_GRPC_MESSAGE_BYTES,
      ...(options.token ? { interceptors: [tokenInterceptor(options.token)] } : {}),
    });
    const initial = options.servingFromStart ? 'SERVING' : 'NOT_SERVING';
    this.health = new HealthImplementation({ '': initial, [SERVICE_NAME]: initial });
    this.health.addToServer(this.server);
    this.server.addService(serviceDefinition(), this.implementation());
    reflectionService().addToServer(this.server);
  }

  setServing(serving: boolean): void {
    const status = serving ? 'SERVING' : 'NOT_SERVING';
    this.health.setStatus('', status);
    this.health.setStatus(SERVICE_NAME, status);
  }

  bind(address: string, credentials: grpc.ServerCredentials): Promise<number> {
    return new Promise((resolve, reject) => {
      this.server.bindAsync(address, credentials, (error, port) => (error ? reject(error) : resolve(port)));
    });
  }

  /**
   * Graceful stop: no new call, the Events streams ended (a graceful stop would wait for them
   * as for calls), the calls in flight let finish; forced after `graceMs`.
   */
  shutdown(graceMs = 5000): Promise<void> {
    for (const end of [...this.eventStreams]) end();
    return new Promise((resolve) => {
      const force = setTimeout(() => {
        this.server.forceShutdown();
        resolve();
      }, graceMs);
      force.unref();
      this.server.tryShutdown(() => {
        clearTimeout(force);
        resolve();
      });
    });
  }

  /** One unary call, answered as a CallReply whatever happens. */
  async answer(request: CallRequestMessage, call: SurfaceCall): Promise<CallReplyMessage> {
    let live: LiveContext | undefined;
    let span: CallSpan | undefined;
    try {
      const params = checkRequest(request);
      live = liveContext(request.method, request, call);
      const ctx = live.ctx;
      if (this.tracing !== undefined) {
        this.plugin.lookup(request.method); // no span named after a method that does not exist
        span = this.tracing.begin(ctx);
      }
      const invoke = (): Promise<unknown> => Promise.resolve().then(() => this.plugin.invoke(request.method, params, ctx));
      const running = span === undefined ? invoke() : span.within(invoke);
      const result = await Promise.race([running, live.over]);
      // Answered, so the deadline's timer did not end it: a method that held the event loop
      // past it kept the timer from running, and is said to have (one clock read).
      this.plugin.lateAnswers.answered(request.method, ctx.deadline);
      const reply = { ok: true, result_json: encodeJson(result) };
      span?.end();
      return reply;
    } catch (error) {
      span?.end({ thrown: error });
      return errorReply(error);
    } finally {
      live?.finish();
    }
  }

  private async stream(call: grpc.ServerWritableStream<CallRequestMessage, unknown>): Promise<void> {
    const request = call.request;
    let live: LiveContext | undefined;
    let iterator: AsyncIterator<unknown> | undefined;
    let span: CallSpan | undefined;
    try {
      const params = checkRequest(request);
      live = liveContext(request.method, request, call);
      this.plugin.lookup(request.method); // method_not_found before any chunk
      span = this.tracing?.begin(live.ctx);
      const chunks = this.plugin.invokeStream(request.method, params, live.ctx)[Symbol.asyncIterator]();
      iterator = chunks;
      // A generator's body runs in the context of whoever calls next(): each step in the span.
      const step = (): Promise<IteratorResult<unknown>> => (span === undefined ? chunks.next() : span.within(() => chunks.next()));
      for (;;) {
        const next = await Promise.race([step(), live.over]);
        if (next.done) break;
        if (!call.write({ chunk_json: encodeJson(next.value) })) await once(call, 'drain');
      }
      // Its last chunk came without the deadline ending it: late, the loop was held (as `answer`).
      this.plugin.lateAnswers.answered(request.method, live.ctx.deadline);
      span?.end();
    } catch (error) {
      span?.end({ thrown: error });
      void iterator?.return?.(undefined)?.catch(() => undefined);
      if (!call.cancelled) call.write({ error: errorMessage(toWireError(error)) });
    } finally {
      live?.finish();
    }
    if (!call.cancelled) call.end();
  }

  /** Runs the `name` hook's step. A hook that throws is the plugin refusing the step:
   * FAILED_PRECONDITION with `init hook failed: Type: message`, the code and words of every
   * SDK (docs/protocol.md, "gRPC binding"), which the host reads as a refusal not worth
   * sending again. INTERNAL, which this answered before, says grpc's own invariants broke. */
  private lifecycle(name: HookName, run: () => Promise<void>): grpc.handleUnaryCall<unknown, object> {
    return (_call, callback) => {
      run().then(
        () => callback(null, {}),
        (error: unknown) => {
          // A lone surrogate as U+FFFD: grpc-js's encodeURI of the message threw on it (URIError),
          // and the host's Init waited out its deadline.
          const wire = sendableError(toWireError(error));
          callback({
            code: grpc.status.FAILED_PRECONDITION,
            details: `${name} hook failed: ${wire.type}: ${wire.message}`,
          });
        },
      );
    };
  }

  /** The calling host's id (`linchkit-host`); undefined once the call was answered
   * INVALID_ARGUMENT for an id off the contract. */
  private host(call: grpc.ServerUnaryCall<unknown, object>, callback: grpc.sendUnaryData<object>): string | undefined {
    try {
      return hostOf(call.metadata);
    } catch (error) {
      if (!(error instanceof BadHostId)) throw error;
      callback({ code: grpc.status.INVALID_ARGUMENT, details: error.message });
      return undefined;
    }
  }

  /** Stop and Destroy: the host leaves; `run` only when it was the last one attached. */
  private leaving(name: HookName, run: () => Promise<void>): grpc.handleUnaryCall<unknown, object> {
    const whenLast = this.lifecycle(name, run);
    return (call, callback) => {
      const host = this.host(call, callback);
      if (host === undefined) return;
      if (this.hosts.othersStay(host)) {
        callback(null, {}); // the plugin goes on serving them
        return;
      }
      whenLast(call, callback);
    };
  }

  private implementation(): grpc.UntypedServiceImplementation {
    const plugin = this.plugin;
    return {
      Describe: (_call: grpc.ServerUnaryCall<unknown, unknown>, callback: grpc.sendUnaryData<unknown>) => {
        callback(null, {
          id: plugin.id,
          version: plugin.version,
          protocol_version: PROTOCOL_VERSION,
          runtime: plugin.runtime,
          methods: plugin.describe(),
        });
      },
      Init: (call: grpc.ServerUnaryCall<{ config_json: Buffer }, object>, callback: grpc.sendUnaryData<object>) => {
        const host = this.host(call, callback);
        if (host === undefined) return;
        if (!this.hosts.join(host)) {
          callback({
            code: grpc.status.RESOURCE_EXHAUSTED,
            details: `${MAX_HOSTS} hosts are attached to this service; one more is refused`,
          });
          return;
        }
        let config: JsonObject;
        try {
          const value = decodeJson(call.request.config_json, 'config_json') ?? {};
          if (!isObject(value)) throw new InvalidParams('config_json must be a JSON object');
          config = value;
        } catch (error) {
          this.hosts.joined(host, false);
          callback({ code: grpc.status.INVALID_ARGUMENT, details: (error as Error).message });
          return;
        }
        this.lifecycle('init', async () => {
          let attached = false;
          try {
            await plugin.runPhase('init', config);
            attached = true; // attached once its Init succeeded, before the reply goes
          } finally {
            this.hosts.joined(host, attached);
          }
        })(call, callback);
      },
      Start: (call: grpc.ServerUnaryCall<unknown, object>, callback: grpc.sendUnaryData<object>) => {
        if (this.host(call, callback) === undefined) return;
        this.lifecycle('start', async () => {
          await plugin.runPhase('start');
          this.setServing(true);
        })(call, callback);
      },
      Stop: this.leaving('stop', async () => {
        this.setServing(false);
        await plugin.runPhase('stop');
      }),
      Destroy: this.leaving('destroy', () => plugin.runPhase('destroy')),
      Call: (call: grpc.ServerUnaryCall<CallRequestMessage, CallReplyMessage>, callback: grpc.sendUnaryData<CallReplyMessage>) => {
        void this.answer(call.request, call).then((reply) => callback(null, reply));
      },
      CallBatch: (
        call: grpc.ServerUnaryCall<{ calls: CallRequestMessage[] }, unknown>,
        callback: grpc.sendUnaryData<unknown>,
      ) => {
        // Every item runs at once: 100,000 of them took 16 s and held every call in memory.
        // More than the dispatcher's batcher ever sends is refused whole, before any runs.
        const count = call.request.calls.length;
        if (count > MAX_BATCH_CALLS) {
          callback({
            code: grpc.status.INVALID_ARGUMENT,
            details: `a batch of ${count} calls is over the limit of ${MAX_BATCH_CALLS}`,
          });
          return;
        }
        call.setMaxListeners(0); // one 'cancelled' listener per item of the batch
        void Promise.all(call.request.calls.map((request) => this.answer(request, call))).then((results) =>
          callback(null, { results }),
        );
      },
      CallStream: (call: grpc.ServerWritableStream<CallRequestMessage, unknown>) => {
        void this.stream(call);
      },
      Events: (call: grpc.ServerDuplexStream<{ name: string; data_json: Buffer }, unknown>) => {
        // Headers at once tell the host the stream is open, so it need not wait for an event.
        call.sendMetadata(new grpc.Metadata());
        // call.write never refuses: for a host that does not read, grpc-js buffered every
        // event (20,000 pongs of 16 KB: +370 MB). Events wait here while the stream is over
        // its high-water mark, at most EVENTS_PER_STREAM, the oldest dropped first.
        const waiting: { name: string; data_json: Buffer }[] = [];
        let full = false;
        let told = false;
        const flush = (): void => {
          while (!full && waiting.length > 0 && !call.cancelled && call.writable) {
            full = !call.write(waiting.shift());
          }
        };
        call.on('drain', () => {
          full = false;
          flush();
        });
        const unsubscribe = plugin.addEventSink((name, dataJson) => {
          if (call.cancelled || !call.writable) return;
          if (waiting.length >= EVENTS_PER_STREAM) {
            waiting.shift();
            if (!told) {
              told = true;
              log.warn('the host is not reading its Events stream; dropping the oldest events');
            }
          }
          waiting.push({ name, data_json: Buffer.from(dataJson) });
          flush();
        });
        call.on('data', (event: { name: string; data_json: Buffer }) => {
          let data: unknown;
          try {
            data = decodeJson(event.data_json, `data of host event ${shown(event.name, 64)}`);
          } catch (error) {
            log.warn(`dropped host event ${shown(event.name, 64)}: ${(error as Error).message}`);
            return;
          }
          plugin.deliverHostEvent(event.name, data).catch((error: unknown) => {
            log.error(`handler of host event ${shown(event.name, 64)} failed: ${String(error)}`);
          });
        });
        const close = (): void => {
          this.eventStreams.delete(close);
          unsubscribe();
          if (!call.cancelled && call.writable) call.end();
        };
        const gone = (): void => {
          this.eventStreams.delete(close);
          unsubscribe();
        };
        this.eventStreams.add(close);
        call.on('end', close);
        call.on('cancelled', gone);
        call.on('error', gone);
      },
    };
  }
}
