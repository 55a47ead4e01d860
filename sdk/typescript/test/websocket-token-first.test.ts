/**
 * The served plugin checks the token before anything else (docs/protocol.md, "WebSocket
 * binding"), as every SDK's WebSocket server: a peer without it is answered 401, in the
 * `unauthorized` envelope, whether it asks for an upgrade or not and even while the plugin
 * stops, and the connection ends with the answer. Before, a plain GET was answered 426 and
 * kept alive, and an upgrade during a stop 503: both told a peer without the token
 * something. Raw sockets as the peers.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import * as net from 'node:net';
import { test } from 'node:test';
import { WebSocket } from 'ws';
import { BearerToken, Plugin, WebSocketPluginServer } from '@linchkit/plugin-sdk';

const BOUNDED = { timeout: 30_000 };
const TOKEN = 's3cret-for-the-token-first-tests';
const UPGRADE =
  'GET / HTTP/1.1\r\nHost: plugin\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
  'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n';

function examplePlugin(): Plugin {
  return new Plugin({ id: 'example', version: '1.0.0' }).method('echo', (params) => params);
}

/** What the server answers on `socket` until it closes the connection (10 s at most). */
async function answerUntilClosed(socket: net.Socket): Promise<string> {
  const chunks: Buffer[] = [];
  socket.on('data', (chunk: Buffer) => chunks.push(chunk));
  const timer = setTimeout(() => socket.destroy(new Error('the connection was not closed within 10 s')), 10_000);
  try {
    await once(socket, 'end');
  } finally {
    clearTimeout(timer);
    socket.destroy();
  }
  return Buffer.concat(chunks).toString();
}

function assertUnauthorized(answer: string): void {
  assert.match(answer, /^HTTP\/1\.1 401 /, answer);
  assert.match(answer, /www-authenticate: Bearer/i, answer);
  const body = JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4));
  assert.equal(body.ok, false);
  assert.equal(body.error.type, 'unauthorized');
}

test('a plain GET without the token is answered 401, not 426, and the connection ends', BOUNDED, async () => {
  const server = new WebSocketPluginServer(examplePlugin(), new BearerToken(TOKEN));
  const [host, port] = (await server.listen('127.0.0.1:0')).split(':');
  try {
    const socket = net.connect(Number(port), host);
    await once(socket, 'connect');
    socket.write('GET / HTTP/1.1\r\nHost: plugin\r\n\r\n');
    assertUnauthorized(await answerUntilClosed(socket));
  } finally {
    await server.close(0);
  }
});

test('an upgrade without the token while the plugin stops is answered 401, not 503', BOUNDED, async () => {
  const server = new WebSocketPluginServer(examplePlugin(), new BearerToken(TOKEN));
  const address = await server.listen('127.0.0.1:0');
  const [host, port] = address.split(':');
  // A session keeps the stop waiting (goaway, then the host's close).
  const session = new WebSocket(`ws://${address}/`, { headers: { Authorization: `Bearer ${TOKEN}` } });
  await once(session, 'message');
  const socket = net.connect(Number(port), host);
  await once(socket, 'connect');
  socket.write(UPGRADE); // all of the head but its blank line: the request is under way
  await new Promise((resolve) => setTimeout(resolve, 50));
  const stopped = server.close(5_000);
  try {
    socket.write('\r\n');
    assertUnauthorized(await answerUntilClosed(socket));
  } finally {
    session.terminate();
    await stopped;
  }
});
