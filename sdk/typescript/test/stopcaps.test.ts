/**
 * How long a stop waits, as an operator sets it: `LINCHKIT_PLUGIN_STOP_GRACE_MS` and
 * `LINCHKIT_PLUGIN_STOP_HOOKS_MS`, whole milliseconds from 0 to 10 minutes, read once at start
 * in every mode; a malformed value is one line and exit 1 (the contract of
 * tests/conformance/test_stop_drains_first.py).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { test } from 'node:test';
import { Logger, Plugin } from '@linchkit/plugin-sdk';
import { HandshakeError } from '#internal/handshake';
import { closeWithin } from '#internal/serve';
import { STOP_GRACE_ENV, STOP_HOOKS_ENV, stopCapsFrom } from '#internal/stopcaps';
import { ENV, PLUGIN, assertOneLineFailure } from './cli-support';

test('the caps come from the environment in whole milliseconds, 5 s each unless set', () => {
  assert.deepEqual(stopCapsFrom({}), { graceMs: 5_000, hooksMs: 5_000 });
  assert.deepEqual(stopCapsFrom({ [STOP_GRACE_ENV]: '', [STOP_HOOKS_ENV]: '' }), { graceMs: 5_000, hooksMs: 5_000 });
  assert.deepEqual(stopCapsFrom({ [STOP_GRACE_ENV]: '1000' }), { graceMs: 1_000, hooksMs: 5_000 });
  assert.deepEqual(stopCapsFrom({ [STOP_HOOKS_ENV]: '250' }), { graceMs: 5_000, hooksMs: 250 });
  assert.deepEqual(stopCapsFrom({ [STOP_GRACE_ENV]: '0', [STOP_HOOKS_ENV]: '0' }), { graceMs: 0, hooksMs: 0 });
  assert.deepEqual(stopCapsFrom({ [STOP_GRACE_ENV]: '600000', [STOP_HOOKS_ENV]: '0001500' }), { graceMs: 600_000, hooksMs: 1_500 });
});

test("the plugin's own defaults in code give way to the variables", () => {
  assert.deepEqual(stopCapsFrom({}, { hooksMs: 30_000 }), { graceMs: 5_000, hooksMs: 30_000 });
  assert.deepEqual(stopCapsFrom({ [STOP_HOOKS_ENV]: '2000' }, { hooksMs: 30_000 }), { graceMs: 5_000, hooksMs: 2_000 });
  assert.throws(
    () => stopCapsFrom({}, { graceMs: 1.5 }, 'serve: '),
    (error: unknown) => error instanceof HandshakeError && error.message.startsWith('serve: stopGraceMs must be a whole number of milliseconds'),
  );
});

test('a malformed cap is refused in one line naming its variable, the rule and the value', () => {
  for (const name of [STOP_GRACE_ENV, STOP_HOOKS_ENV]) {
    for (const value of ['5s', '-1', '1.5', '+5', ' 5', '1e3', '0x10', '600001', '99999999999999999999999', 'five']) {
      assert.throws(
        () => stopCapsFrom({ [name]: value }, {}, 'serve: '),
        (error: unknown) =>
          error instanceof HandshakeError &&
          error.message.startsWith(`serve: ${name} must be a whole number of milliseconds from 0 to 600000 (10 minutes), not `) &&
          error.message.includes(value) &&
          !error.message.includes('\n'),
        `${name}=${JSON.stringify(value)}`,
      );
    }
  }
});

test('every mode refuses a malformed cap at start, in one line and exit 1', () => {
  const modes: [string[], Record<string, string>, string][] = [
    [['serve', '--address', '127.0.0.1:0'], {}, 'serve: '],
    [['serve', '--websocket', '--address', '127.0.0.1:0'], {}, 'serve: '],
    [['connect', '--url', 'ws://127.0.0.1:9/v1/plugins/connect'], {}, 'connect: '],
    [[], { LINCHKIT_PLUGIN_MAGIC_COOKIE: 'd1spatch3r-pl4g1n', LINCHKIT_PLUGIN_PROTOCOL_VERSIONS: '1' }, ''],
  ];
  for (const [args, vars, prefix] of modes) {
    const done = spawnSync(PLUGIN, args, {
      encoding: 'utf8',
      env: { ...ENV, ...vars, [STOP_HOOKS_ENV]: '5s' },
      timeout: 30_000,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const line = assertOneLineFailure({ status: done.status, stdout: done.stdout, stderr: done.stderr });
    assert.equal(line, `${prefix}${STOP_HOOKS_ENV} must be a whole number of milliseconds from 0 to 600000 (10 minutes), not "5s"`, args.join(' '));
  }
});

test('run by hand, without the cookie, the plugin says the dispatcher starts it, even with a malformed cap', () => {
  // The cookie is checked first, as every SDK does: the caps' refusal hid the hint.
  const done = spawnSync(PLUGIN, [], {
    encoding: 'utf8',
    env: { ...ENV, [STOP_GRACE_ENV]: 'soon' },
    timeout: 30_000,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const line = assertOneLineFailure({ status: done.status, stdout: done.stdout, stderr: done.stderr });
  assert.match(line, /started by the dispatcher, not by hand/);
});

test('hooks of 0 ms are not waited for: a stuck hook is abandoned at once, the warning naming 0 s', async () => {
  const plugin = new Plugin({ id: 'p', version: '1' }).onStop(() => new Promise<void>(() => undefined));
  await plugin.runPhase('init', {});
  await plugin.runPhase('start');
  const lines: string[] = [];
  const began = Date.now();
  // The hooks' timer is unref'd, as it is when the plugin stops: this keeps the test alive.
  const alive = setInterval(() => undefined, 1_000);
  try {
    await closeWithin(plugin, 0, new Logger('linchkit plugin', (line) => lines.push(line)));
  } finally {
    clearInterval(alive);
  }
  assert.ok(Date.now() - began < 1_000);
  assert.equal(lines.length, 1, lines.join(''));
  assert.ok(lines[0]!.endsWith(' WARN linchkit plugin: the stop hook did not finish within 0 s of the stop; exiting without it\n'), lines[0]);
});
