import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DeadlineExceeded, InvalidParams, MethodNotFound, Params, PluginError, toWireError } from '@linchkit/plugin-sdk';
import { errorReply } from '#internal/server';
import { digest } from '../examples/example-plugin';

test("a plugin's own error keeps its type, retryable, details and retry_after", () => {
  const error = new PluginError('InsufficientFunds', 'balance is 100', { retryable: true, details: { balance: 100 }, retryAfter: 1.5 });
  assert.deepEqual(toWireError(error), {
    type: 'InsufficientFunds',
    message: 'balance is 100',
    retryable: true,
    details: { balance: 100 },
    retryAfter: 1.5,
  });
  const reply = errorReply(error);
  assert.equal(reply.ok, false);
  assert.equal(reply.error?.type, 'InsufficientFunds');
  assert.equal(reply.error?.retryable, true);
  assert.equal(reply.error?.retry_after, 1.5);
  assert.deepEqual(JSON.parse(reply.error?.details_json.toString() ?? ''), { balance: 100 });
});

test('the stable types and their retryability', () => {
  assert.deepEqual(toWireError(new InvalidParams('x')), { type: 'invalid_params', message: 'x', retryable: false });
  assert.equal(toWireError(new MethodNotFound('x')).type, 'method_not_found');
  assert.deepEqual(toWireError(new DeadlineExceeded('late')), { type: 'deadline_exceeded', message: 'late', retryable: true });
  const reply = errorReply(new InvalidParams('x'));
  assert.equal(reply.error?.details_json.length, 0, 'no details: empty bytes');
  assert.equal(reply.error?.retry_after, 0);
});

test('anything else thrown is answered with its name, not retryable', () => {
  assert.deepEqual(toWireError(new TypeError('x is undefined')), { type: 'TypeError', message: 'x is undefined', retryable: false });
  assert.deepEqual(toWireError('just a string'), { type: 'Error', message: 'just a string', retryable: false });
});

test('params of the wrong shape are invalid_params', () => {
  assert.throws(() => new Params([1, 2], 'count'), InvalidParams);
  // The words every SDK uses: 'a string', 'a number', 'a boolean' (Go, Rust, Java).
  assert.throws(() => new Params('Ada', 'greet'), /greet takes an object of named params, got a string$/);
  assert.throws(() => new Params(4, 'greet'), /got a number$/);
  assert.throws(() => new Params(undefined, 'greet'), /got null$/);
  const params = new Params({ n: 2.5, s: 1 }, 'count');
  assert.throws(() => params.int('n'), /must be an integer/);
  assert.throws(() => params.int('missing'), /needs the param 'missing'/);
  assert.throws(() => params.str('s'), /must be a string/);
  assert.equal(new Params({ n: 3 }, 'count').int('n'), 3);
});

test('digest hashes the previous 32-byte digest each round', () => {
  assert.equal(digest('abc', 1), 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad');
  assert.equal(digest('abc', 2), '4f8b42c22dd3729b519ba6f68d2da7cc5b2d606d05daed5ad5128cc03e6c6358');
});
