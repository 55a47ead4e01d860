/**
 * The example plugin of docs/protocol.md ("The example plugin, in every language"),
 * written on the TypeScript SDK: the author writes only the methods.
 */
import { createHash } from 'node:crypto';
import { InvalidParams, Params, Plugin, PluginError, serve } from '@linchkit/plugin-sdk';

/** The most letters x `pad` asks for (64 MiB): the suite's largest chunk is 9 MB, and a
 * caller's 2**40 must be refused before anything is built, not end in a RangeError. */
const MAX_PAD = 64 * 1024 * 1024;
/** The most chunks `count` sends: a unary call collects them all before it answers. */
const MAX_COUNT = 1_000_000;

export function digest(data: string, rounds: number): string {
  let bytes: Buffer = createHash('sha256').update(data, 'utf8').digest();
  for (let i = 1; i < rounds; i++) bytes = createHash('sha256').update(bytes).digest();
  return rounds === 0 ? Buffer.from(data, 'utf8').toString('hex') : bytes.toString('hex');
}

/** Fails the hook a config's `fail_hook` names: how the conformance suite sees what the SDK
 * answers a failing hook. */
function failIfNamed(config: Record<string, unknown>, hook: string): void {
  if (config.fail_hook === hook) throw new PluginError('BadConfig', `fail_hook names ${hook}`);
}

/** `pad` letters x (0 when absent, at most `MAX_PAD`): how the conformance suite makes a chunk
 * or an event as large as it needs. */
function padding(p: Params): string {
  if (!('pad' in p.values)) return '';
  const pad = p.int('pad', { min: 0 });
  if (pad > MAX_PAD) {
    throw new InvalidParams(`pad must be at most ${MAX_PAD} (64 MiB), got ${pad}`, { param: 'pad' });
  }
  return 'x'.repeat(pad);
}

/** The `n` of count, at most `MAX_COUNT`. */
function countOf(p: Params): number {
  const n = p.int('n', { min: 0 });
  if (n > MAX_COUNT) {
    throw new InvalidParams(`n must be at most ${MAX_COUNT}, got ${n}`, { param: 'n' });
  }
  return n;
}

/** The number `non_finite`'s `value` names: how the conformance suite sees that a result JSON
 * cannot carry is refused, not sent as null. A switch, not a lookup in an object: `toString`
 * would find Object.prototype's. */
function nonFinite(value: string): number {
  switch (value) {
    case 'nan':
      return NaN;
    case 'inf':
      return Infinity;
    case '-inf':
      return -Infinity;
  }
  throw new InvalidParams(`non_finite: 'value' must be "nan", "inf" or "-inf", got ${JSON.stringify(value)}`, { param: 'value' });
}

export function examplePlugin(): Plugin {
  const plugin = new Plugin({ id: 'example', version: '1.0.0', runtime: 'typescript' });

  plugin.method('echo', (params) => params, { description: 'the params, unchanged' });

  plugin.method(
    'digest',
    (params) => {
      const p = new Params(params, 'digest');
      return digest(p.str('data'), p.int('rounds', { min: 0 }));
    },
    { description: 'hex of SHA-256 applied `rounds` times to `data` (CPU-bound)' },
  );

  plugin.method(
    'fail',
    (params) => {
      const p = new Params(params, 'fail');
      throw new PluginError('ExampleFailure', p.str('message'), { retryable: false });
    },
    { description: 'fails with the business error ExampleFailure' },
  );

  plugin.method(
    'sleep',
    async (params, ctx) => {
      const ms = new Params(params, 'sleep').int('ms', { min: 0 });
      await ctx.sleep(ms);
      return { slept_ms: ms };
    },
    { description: 'sleeps `ms` milliseconds, or gives up at the deadline' },
  );

  plugin.streamingMethod(
    'count',
    function* (params) {
      const p = new Params(params, 'count');
      const n = countOf(p);
      const pad = padding(p);
      for (let i = 0; i < n; i++) yield pad === '' ? { i } : { i, pad };
    },
    {
      description:
        'chunks {"i": 0} … {"i": n-1} (`n` at most 1000000); with `pad` > 0 (at most 64 MiB) each also carries `pad` letters x',
    },
  );

  plugin.method(
    'emit',
    (params) => {
      const p = new Params(params, 'emit');
      const name = p.str('name');
      const pad = padding(p);
      plugin.emit(name, pad === '' ? p.any('data') : pad);
      return true;
    },
    { description: 'emits plugin event `name` with `data` (with `pad` > 0, at most 64 MiB: `pad` letters x instead)' },
  );

  plugin.method(
    'non_finite',
    (params) => ({ x: nonFinite(new Params(params, 'non_finite').str('value')) }),
    { description: 'returns {"x": NaN, Infinity or -Infinity} as `value` ("nan", "inf", "-inf") says, which JSON cannot carry' },
  );

  plugin.method(
    'not_unicode',
    // Half an emoji: a UTF-16 index that splits a surrogate pair, as `s.slice(0, n)` does.
    () => ({ text: 'smile 😀'.slice(0, 7) }),
    { description: 'returns {"text": "smile " and half an emoji}, a string that is not valid Unicode (a lone surrogate)' },
  );

  plugin.method('config', () => plugin.config, { description: 'the JSON object passed to Init' });

  // How many times each lifecycle hook ran, for as long as the process lives.
  const hooks = { init: 0, start: 0, stop: 0, destroy: 0 };
  plugin.onInit((config) => {
    hooks.init++;
    failIfNamed(config, 'init');
  });
  plugin.onStart(() => {
    hooks.start++;
    failIfNamed(plugin.config, 'start');
  });
  // A config's `say_hooks` has the stop and destroy hooks each write a line to stderr: how
  // the conformance suite sees that they ran once the process is gone.
  const sayIfAsked = (hook: string): void => {
    if (plugin.config.say_hooks === true) process.stderr.write(`example: ${hook} hook ran\n`);
  };
  // A config's `stall_hook` has that hook never return (a close stuck on a peer that does
  // not answer, its socket keeping the process alive: a timer here): how the suite sees
  // that a stop does not wait for it.
  const stallIfNamed = (hook: string): Promise<void> =>
    plugin.config.stall_hook === hook
      ? new Promise<void>(() => {
          setInterval(() => undefined, 60_000);
        })
      : Promise.resolve();
  plugin.onStop(() => {
    hooks.stop++;
    sayIfAsked('stop');
    return stallIfNamed('stop');
  });
  plugin.onDestroy(() => {
    hooks.destroy++;
    sayIfAsked('destroy');
    return stallIfNamed('destroy');
  });
  plugin.method(
    'hooks',
    async (params, ctx) => {
      // Counted later: whether a stop ran the hooks under a call still in flight.
      const p = new Params(params ?? {}, 'hooks');
      if ('after_ms' in p.values) await ctx.sleep(p.int('after_ms', { min: 0 }));
      return { ...hooks };
    },
    { description: 'how many times each lifecycle hook ran, counted `after_ms` from now' },
  );

  plugin.on('ping', (data) => plugin.emit('pong', data));
  // A handler that fails: the SDK logs it at ERROR and goes on.
  plugin.on('fail', (data) => {
    throw new Error(String((data as { message?: unknown } | null)?.message));
  });
  return plugin;
}

if (require.main === module) {
  void serve(examplePlugin());
}
