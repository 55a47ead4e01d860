import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  HandshakeError,
  MAGIC_COOKIE_VALUE,
  handshakeLine,
  negotiateVersion,
  parseCommand,
  parseHandshakeLine,
  rawStdBase64,
  readHandshakeEnv,
} from '#internal/handshake';

const cookie = { LINCHKIT_PLUGIN_MAGIC_COOKIE: MAGIC_COOKIE_VALUE };

test('version negotiation picks the highest common version', () => {
  assert.equal(negotiateVersion('1'), 1);
  assert.equal(negotiateVersion(' 3, 1 ,2'), 1);
  assert.equal(negotiateVersion('1,2', [1, 2]), 2);
  assert.equal(negotiateVersion('2'), undefined);
  assert.equal(negotiateVersion(undefined), 1, 'a host that offers nothing speaks 1');
  assert.equal(negotiateVersion('x,,1'), 1);
});

test('a plugin run without the magic cookie refuses with a hint', () => {
  assert.throws(() => readHandshakeEnv({}), (error: unknown) => error instanceof HandshakeError && /not by hand/.test(error.message));
  assert.throws(() => readHandshakeEnv({ LINCHKIT_PLUGIN_MAGIC_COOKIE: 'wrong' }), HandshakeError);
});

test('the handshake environment: defaults, tcp, socket dir, client cert', () => {
  assert.deepEqual(readHandshakeEnv(cookie), { appVersion: 1, network: 'unix', socketDir: undefined, clientCertPem: undefined });
  const pem = '-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n';
  const config = readHandshakeEnv({
    ...cookie,
    LINCHKIT_PLUGIN_PROTOCOL_VERSIONS: '1',
    LINCHKIT_PLUGIN_NETWORK: 'tcp',
    LINCHKIT_PLUGIN_SOCKET_DIR: '/tmp/x',
    LINCHKIT_PLUGIN_CLIENT_CERT: pem,
  });
  assert.deepEqual(config, { appVersion: 1, network: 'tcp', socketDir: '/tmp/x', clientCertPem: pem });
  assert.throws(() => readHandshakeEnv({ ...cookie, LINCHKIT_PLUGIN_NETWORK: 'udp' }), /unix' or 'tcp/);
  assert.throws(() => readHandshakeEnv({ ...cookie, LINCHKIT_PLUGIN_PROTOCOL_VERSIONS: '7,8' }), /no common protocol version/);
  assert.throws(() => readHandshakeEnv({ ...cookie, LINCHKIT_PLUGIN_CLIENT_CERT: 'not a pem' }), /PEM/);
});

test('the handshake line: six fields, the certificate in unpadded base64', () => {
  assert.equal(handshakeLine(1, 'tcp', '127.0.0.1:4000'), '1|1|tcp|127.0.0.1:4000|grpc|');
  const der = Uint8Array.from([1, 2, 3, 4]); // base64 "AQIDBA==" padded
  assert.equal(rawStdBase64(der), 'AQIDBA');
  const line = handshakeLine(1, 'unix', '/tmp/p.sock', der);
  assert.equal(line, '1|1|unix|/tmp/p.sock|grpc|AQIDBA');
  const parsed = parseHandshakeLine(line + '\n');
  assert.equal(parsed.network, 'unix');
  assert.equal(parsed.address, '/tmp/p.sock');
  assert.deepEqual([...(parsed.serverCertDer ?? [])], [1, 2, 3, 4]);
  assert.equal(parseHandshakeLine('1|1|tcp|127.0.0.1:1|grpc|').serverCertDer, undefined);
  assert.throws(() => parseHandshakeLine('1|1|tcp|grpc'), /6 fields/);
});

test('the command line: serve --address, or nothing for subprocess mode', () => {
  assert.deepEqual(parseCommand([]), { mode: 'subprocess' });
  assert.deepEqual(parseCommand(['serve', '--address', '127.0.0.1:0']), { mode: 'service', address: '127.0.0.1:0', registry: new Map() });
  assert.deepEqual(parseCommand(['serve', '--address=0.0.0.0:9']), { mode: 'service', address: '0.0.0.0:9', registry: new Map() });
  assert.deepEqual(parseCommand(['serve']), { mode: 'service', address: '127.0.0.1:0', registry: new Map() });
  assert.throws(() => parseCommand(['run']), HandshakeError);
  assert.throws(() => parseCommand(['serve', '--port', '1']), HandshakeError);
});
