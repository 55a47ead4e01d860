/**
 * Reading a method's JSON params with errors that say what was wrong: every failure is an
 * `InvalidParams`, which the host receives as `invalid_params`.
 */
import { InvalidParams } from './errors';

export type JsonObject = Record<string, unknown>;

export function isObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** `params` as an object, or `InvalidParams` naming what came instead. */
export function expectObject(params: unknown, method: string): JsonObject {
  if (isObject(params)) return params;
  const got =
    params === null || params === undefined ? 'null' : Array.isArray(params) ? 'an array' : `a ${typeof params}`;
  throw new InvalidParams(`${method} takes an object of named params, got ${got}`);
}

/** Typed access to the fields of an object of params. */
export class Params {
  readonly method: string;
  readonly values: JsonObject;

  constructor(params: unknown, method: string) {
    this.method = method;
    this.values = expectObject(params, method);
  }

  private required(name: string): unknown {
    if (!(name in this.values)) {
      throw new InvalidParams(`${this.method} needs the param '${name}'`, { param: name });
    }
    return this.values[name];
  }

  /** An integer (a JSON number with no fraction). */
  int(name: string, options: { min?: number; max?: number } = {}): number {
    const value = this.required(name);
    if (typeof value === 'bigint') {
      throw new InvalidParams(`${this.method}: '${name}' is ${value}, beyond the integers this method takes`, { param: name });
    }
    if (typeof value !== 'number' || !Number.isSafeInteger(value)) {
      throw new InvalidParams(`${this.method}: '${name}' must be an integer, got ${JSON.stringify(value)}`, { param: name });
    }
    if (options.min !== undefined && value < options.min) {
      throw new InvalidParams(`${this.method}: '${name}' must be at least ${options.min}, got ${value}`, { param: name });
    }
    if (options.max !== undefined && value > options.max) {
      throw new InvalidParams(`${this.method}: '${name}' must be at most ${options.max}, got ${value}`, { param: name });
    }
    return value;
  }

  str(name: string): string {
    const value = this.required(name);
    if (typeof value !== 'string') {
      throw new InvalidParams(`${this.method}: '${name}' must be a string, got ${String(value)}`, { param: name });
    }
    return value;
  }

  /** Any JSON value; `fallback` when absent. */
  any(name: string, fallback: unknown = null): unknown {
    return name in this.values ? this.values[name] : fallback;
  }
}
