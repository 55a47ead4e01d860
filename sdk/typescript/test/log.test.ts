/**
 * The SDK's stderr lines and the console of a subprocess plugin: one line a record, the level
 * where the host reads it (the dispatcher's providers/subprocess/levels.py: an optional
 * timestamp, then an upper-case level word).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Logger } from '@linchkit/plugin-sdk';
import { formatLine, routeConsole } from '#internal/log';

const HOST_READS = /^[0-9][0-9TZ:./+\- ]*[ T](DEBUG|INFO|WARN|ERROR) /;

test('a record is one line: time, level, name, message', () => {
  const line = formatLine('WARN', 'linchkit plugin', 'dropping events', new Date(Date.UTC(2026, 11, 4, 0, 10)));
  assert.equal(line, '2026-12-04T00:10:00.000Z WARN linchkit plugin: dropping events\n');
  assert.equal(HOST_READS.exec(line)?.[1], 'WARN');
});

test("a message's newlines (an error's stack) stay on the record's line", () => {
  const lines: string[] = [];
  new Logger('svc', (line) => lines.push(line)).error(new Error('the ledger is gone').stack!);
  assert.equal(lines.length, 1);
  assert.equal(lines[0]!.split('\n').length, 2, lines[0]); // the one line and its end
  assert.equal(HOST_READS.exec(lines[0]!)?.[1], 'ERROR');
  assert.match(lines[0]!, /svc: Error: the ledger is gone\\n {4}at /);
});

test('the console of a subprocess plugin says each call’s level', () => {
  const saved = { ...console };
  const lines: string[] = [];
  try {
    routeConsole(new Logger('example', (line) => lines.push(line)));
    console.log('plain %d', 1);
    console.info('info');
    console.debug('noise');
    console.warn('disk almost full', { free: 3 });
    console.error('two\nlines');
  } finally {
    Object.assign(console, saved);
  }
  assert.deepEqual(
    lines.map((line) => HOST_READS.exec(line)?.[1]),
    ['INFO', 'INFO', 'DEBUG', 'WARN', 'ERROR'],
  );
  assert.ok(lines[0]!.endsWith(' example: plain 1\n'), lines[0]);
  assert.ok(lines[3]!.endsWith(' example: disk almost full { free: 3 }\n'), lines[3]);
  assert.ok(lines[4]!.endsWith(' example: two\\nlines\n'), lines[4]);
});
