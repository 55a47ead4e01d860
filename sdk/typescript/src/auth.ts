/**
 * The bearer token of service mode (docs/protocol.md, "gRPC binding"): read from
 * `LINCHKIT_PLUGIN_TOKEN_FILE` (a mounted secret) or `LINCHKIT_PLUGIN_TOKEN`, never from a
 * command-line argument (`ps` shows those to every user). `tokenInterceptor` refuses every
 * RPC of the plugin service without `authorization: Bearer <token>` as `UNAUTHENTICATED`,
 * comparing in constant time; the health service stays open (orchestrators probe it), and
 * so does server reflection (it tells only the schema, which proto/plugin.proto publishes).
 */
import { timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { HandshakeError } from './handshake';

export const TOKEN_ENV = 'LINCHKIT_PLUGIN_TOKEN';
export const TOKEN_FILE_ENV = 'LINCHKIT_PLUGIN_TOKEN_FILE';

/** All a refused caller learns: never what it sent. */
const UNAUTHENTICATED = 'missing or wrong bearer token';
const OPEN_PREFIXES = [
  '/grpc.health.v1.Health/',
  '/grpc.reflection.v1.ServerReflection/',
  '/grpc.reflection.v1alpha.ServerReflection/',
];

export class BearerToken {
  readonly #expected: Buffer;

  constructor(token: string) {
    const trimmed = token.trim();
    if (trimmed === '') throw new HandshakeError('the bearer token is empty');
    if (!/^[\x21-\x7e]+$/.test(trimmed)) {
      throw new HandshakeError('the bearer token must be printable ASCII without spaces');
    }
    this.#expected = Buffer.from(`bearer ${trimmed}`, 'ascii');
  }

  /** The token from the file, else the variable; undefined when neither is set; both is refused. */
  static configured(env: NodeJS.ProcessEnv): BearerToken | undefined {
    const file = env[TOKEN_FILE_ENV] ?? '';
    const value = env[TOKEN_ENV] ?? '';
    if (file !== '' && value !== '') throw new HandshakeError(`set either ${TOKEN_FILE_ENV} or ${TOKEN_ENV}, not both`);
    if (file !== '') {
      let text: string;
      try {
        text = readFileSync(file, 'latin1');
      } catch (error) {
        throw new HandshakeError(`cannot read the token file '${file}': ${(error as NodeJS.ErrnoException).code ?? 'error'}`);
      }
      try {
        return new BearerToken(text);
      } catch (error) {
        throw new HandshakeError(`the token file '${file}': ${(error as Error).message}`);
      }
    }
    return value === '' ? undefined : new BearerToken(value);
  }

  /** The token itself, for a plugin that presents it (dialling the gateway). */
  secret(): string {
    return this.#expected.subarray('bearer '.length).toString('ascii');
  }

  /** Whether an `authorization` value carries the token (constant time for equal lengths). */
  admits(authorization: string | undefined): boolean {
    if (authorization === undefined) return false;
    const value = authorization.trim();
    const space = value.indexOf(' ');
    const scheme = space < 0 ? value : value.slice(0, space);
    const credentials = space < 0 ? '' : value.slice(space + 1).trim();
    const presented = Buffer.from(`${scheme.toLowerCase()} ${credentials}`, 'latin1');
    return presented.length === this.#expected.length && timingSafeEqual(presented, this.#expected);
  }

  /**
   * Whether a request's `authorization` headers, every one it sent, are exactly one that
   * carries the token. Two are refused whatever they say, as over gRPC: one hop may read the
   * first, another the last. (Node's `request.headers` keeps only the first: pass
   * `request.headersDistinct.authorization`.)
   */
  admitsHeaders(authorization: readonly string[] | undefined): boolean {
    return authorization !== undefined && authorization.length === 1 && this.admits(authorization[0]);
  }

  toString(): string {
    return 'BearerToken(hidden)';
  }

  [Symbol.for('nodejs.util.inspect.custom')](): string {
    return this.toString();
  }
}

/** A grpc-js server interceptor admitting health and reflection, other RPCs only with `token`. */
export function tokenInterceptor(token: BearerToken): grpc.ServerInterceptor {
  return (method, call) => {
    const listener = new grpc.ServerListenerBuilder()
      .withOnReceiveMetadata((metadata, next) => {
        const values = metadata.get('authorization');
        const presented = values.length === 1 && typeof values[0] === 'string' ? values[0] : undefined;
        if (OPEN_PREFIXES.some((prefix) => method.path.startsWith(prefix)) || token.admits(presented)) {
          next(metadata);
        } else {
          call.sendStatus({ code: grpc.status.UNAUTHENTICATED, details: UNAUTHENTICATED, metadata: new grpc.Metadata() });
        }
      })
      .build();
    const responder = new grpc.ResponderBuilder().withStart((next) => next(listener)).build();
    return new grpc.ServerInterceptingCall(call, responder);
  };
}
