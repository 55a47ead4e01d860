/**
 * What the `serve` and `connect` command-line tests share (the contract of
 * tests/conformance/test_serve_cli.py): this SDK's own example plugin run as an operator
 * runs it, and the shape of a refusal: one line on stderr, exit 1, never a stack trace.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

/** This SDK's own example plugin, whatever LINCHKIT_EXAMPLE_PLUGIN names for subprocess.test.ts. */
export const PLUGIN = path.resolve(__dirname, '../example-plugin');
/** No token in the environment, so nothing is read from the developer's own. */
export const ENV = { PATH: process.env.PATH ?? '' };
/** Words that mean the runtime printed a crash instead of an answer. */
export const CRASHES = ['Error: ', 'RangeError', '    at ', 'Exception'];

export interface Ran {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** `example-plugin COMMAND ARGS…`, to its end (30 s at most). */
export function runPlugin(command: string, ...args: string[]): Ran {
  const done = spawnSync(PLUGIN, [command, ...args], { encoding: 'utf8', env: ENV, timeout: 30_000, stdio: ['ignore', 'pipe', 'pipe'] });
  return { status: done.status, stdout: done.stdout, stderr: done.stderr };
}

/** The one line a refusal is, after checking it is one: exit 1, nothing on stdout, no crash. */
export function assertOneLineFailure(done: Ran): string {
  assert.equal(done.status, 1, done.stderr);
  assert.equal(done.stdout, '');
  for (const crash of CRASHES) assert.ok(!done.stderr.includes(crash), done.stderr);
  const lines = done.stderr.trim().split('\n');
  assert.equal(lines.length, 1, done.stderr);
  return lines[0]!;
}
