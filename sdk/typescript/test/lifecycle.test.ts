import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Logger, Plugin } from '@linchkit/plugin-sdk';
import { closeWithin } from '#internal/serve';

function counted(): { plugin: Plugin; ran: string[] } {
  const ran: string[] = [];
  const plugin = new Plugin({ id: 'p', version: '1' })
    .onInit((config) => void ran.push(`init ${JSON.stringify(config)}`))
    .onStart(() => void ran.push('start'))
    .onStop(() => void ran.push('stop'))
    .onDestroy(() => void ran.push('destroy'));
  return { plugin, ran };
}

test('every Init runs the init hooks and the last config is held; start runs once', async () => {
  const { plugin, ran } = counted();
  await plugin.runPhase('init', { host: 'a' });
  await plugin.runPhase('start');
  await plugin.runPhase('init', { host: 'b' }); // a second host attaching
  await plugin.runPhase('start');
  assert.deepEqual(ran, ['init {"host":"a"}', 'start', 'init {"host":"b"}']);
  assert.deepEqual(plugin.config, { host: 'b' });
  assert.equal(plugin.started, true);
});

test('an Init after stop and destroy begins the lifecycle anew', async () => {
  const { plugin, ran } = counted();
  for (const host of ['a', 'b']) {
    await plugin.runPhase('init', { host });
    await plugin.runPhase('start');
    await plugin.runPhase('stop');
    await plugin.runPhase('destroy');
  }
  await plugin.runPhase('init', { host: 'c' });
  await plugin.runPhase('start');
  await plugin.close(); // the shutdown: the lifecycle under way is stopped and destroyed
  await plugin.close();
  const cycle = ['start', 'stop', 'destroy'];
  assert.deepEqual(ran, ['init {"host":"a"}', ...cycle, 'init {"host":"b"}', ...cycle, 'init {"host":"c"}', ...cycle]);
  assert.deepEqual(plugin.config, { host: 'c' });
});

test('a start that failed runs again at the next Start, and the plugin is not started meanwhile', async () => {
  const ran: string[] = [];
  let refuse = true;
  const plugin = new Plugin({ id: 'p', version: '1' }).onStart(() => {
    ran.push('start');
    if (refuse) throw new Error('the database is down');
  });
  await plugin.runPhase('init', {});
  await assert.rejects(plugin.runPhase('start'), /the database is down/);
  assert.equal(plugin.started, false);
  refuse = false;
  await plugin.runPhase('start'); // before: answered at once, the hook never run again
  assert.deepEqual(ran, ['start', 'start']);
  assert.equal(plugin.started, true);
});

test('a hook still running at the stop cap is abandoned with a warning naming it alone', async () => {
  const never = (): Promise<void> => new Promise<void>(() => undefined);
  // The hooks' timer is unref'd, as it is when the plugin stops: this keeps the test alive.
  const alive = setInterval(() => undefined, 1_000);
  try {
    for (const stalled of ['stop', 'destroy'] as const) {
      const plugin = new Plugin({ id: 'p', version: '1' });
      if (stalled === 'stop') plugin.onStop(never);
      else plugin.onDestroy(never);
      await plugin.runPhase('init', {});
      await plugin.runPhase('start');
      const lines: string[] = [];
      await closeWithin(plugin, 100, new Logger('linchkit plugin', (line) => lines.push(line)));
      assert.equal(lines.length, 1, lines.join(''));
      // As the Java, Rust, Go and Python SDKs word it; before, "the stop/destroy hooks".
      assert.ok(lines[0]!.endsWith(` WARN linchkit plugin: the ${stalled} hook did not finish within 0.1 s of the stop; exiting without it\n`), lines[0]);
    }
  } finally {
    clearInterval(alive);
  }
});
