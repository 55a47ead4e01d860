/**
 * The host's `error` frames (docs/protocol.md, "WebSocket binding"): the host could not use a
 * frame the plugin sent. Never answered, or the two peers could trade them for ever; each is
 * said at INFO on one line, the host's message escaped and cut as a close reason is, but only
 * the first `LOGGED_HOST_ERRORS` of a connection, then one line saying the rest are not: the
 * host chooses how many it sends. Before, each was said at WARN, the error's JSON cut to 200
 * bytes, however many came. The SDK's real server on loopback, a raw `ws` peer as the host.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { WebSocket } from 'ws';
import { Plugin, WebSocketPluginServer } from '@linchkit/plugin-sdk';
import { log } from '#internal/log';
import { LOGGED_HOST_ERRORS, errorText } from '#internal/websocket';
import { decodeJson } from '#internal/server';
import { Frames } from './ws-frames';

const BOUNDED = { timeout: 60_000 };

test('an error frame’s text is its message, or else what it is', () => {
  const said: [string, string][] = [
    ['{"type":"provider_error","message":"unknown frame type"}', 'unknown frame type'],
    ['"frame 7 went astray"', 'frame 7 went astray'],
    ['{"message":7}', '{"message":7}'],
    ['["x"]', '["x"]'],
    ['null', 'null'],
  ];
  for (const [error, text] of said) assert.equal(errorText(decodeJson(Buffer.from(error), 'an error')), text, error);
  assert.equal(errorText(undefined), 'null');
});

test('the host’s error frames are said escaped, only the first few, and the session serves on', BOUNDED, async (t) => {
  const said: string[] = [];
  const warned: string[] = [];
  t.mock.method(log, 'info', (message: string) => said.push(message));
  t.mock.method(log, 'warn', (message: string) => warned.push(message));
  const plugin = new Plugin({ id: 'errors', version: '1.0.0' }).method('echo', (params) => params);
  const server = new WebSocketPluginServer(plugin, undefined);
  const host = new WebSocket(`ws://${await server.listen('127.0.0.1:0')}/`);
  const frames = new Frames(host);
  try {
    assert.equal((await frames.next()).type, 'hello');
    const forged = '\x1b[2J\nINFO forged: the plugin stopped';
    host.send(JSON.stringify({ type: 'error', error: { type: 'provider_error', message: forged } }));
    for (let i = 1; i < 1000; i++) host.send(JSON.stringify({ type: 'error', id: 3, error: { message: 'again' } }));
    host.send(JSON.stringify({ type: 'call', id: 1, request: { v: 1, method: 'echo', params: 'still here', context: {} } }));
    // None is answered: the call's answer is the next frame.
    assert.deepEqual(await frames.next(), { type: 'response', id: 1, response: { ok: true, result: 'still here' } });
  } finally {
    host.terminate();
    await server.close(0);
  }
  assert.deepEqual(said, [
    'the host could not use a frame: \\x1b[2J\\nINFO forged: the plugin stopped',
    ...Array<string>(LOGGED_HOST_ERRORS - 1).fill('the host could not use a frame: again'),
    'the host sent more than 10 error frames on this connection; further ones are not logged',
  ]);
  assert.deepEqual(warned, []);
});
