/**
 * `connect`'s TLS files (connecttls.ts): the flags and the variables of every SDK's
 * `connect`, each file checked before the plugin dials, a refusal one line naming the flag
 * (or the variable) and the file and never a byte of a key; and a gateway's alert about the
 * plugin's certificate in words, where Node gives OpenSSL's error line (before, a
 * `connect` took none of these flags, and said an alert as
 * `…:error:0A00045C:SSL routines:ssl3_read_bytes:tlsv13 alert certificate required:../deps/…`).
 */
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';
import { parseConnectCommand } from '#internal/connect';
import { CLIENT_KEY_ENV, GATEWAY_CA_ENV, alertRefusal, clientTls } from '#internal/connecttls';
import { HandshakeError } from '#internal/handshake';
import { generateServerCertificate } from '#internal/tls';

const URL = 'wss://gateway.example/v1/plugins/connect';

test('connect takes the TLS flags, with or without =', () => {
  const command = parseConnectCommand(['connect', '--url', URL, '--ca-file', 'ca.pem', '--cert-file=c.pem', '--key-file', 'k.pem']);
  assert.deepEqual(command, { mode: 'connect', url: URL, config: undefined, tls: { caFile: 'ca.pem', certFile: 'c.pem', keyFile: 'k.pem' } });
});

test('files it cannot use are refused in one line naming the flag or the variable and the file, never a key', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'connect-tls-'));
  const plugin = await generateServerCertificate('plugin');
  const other = await generateServerCertificate('other');
  const file = (name: string, text: string): string => {
    writeFileSync(path.join(dir, name), text);
    return path.join(dir, name);
  };
  const cert = file('plugin.pem', plugin.certPem);
  const key = file('plugin.key', plugin.keyPem);
  const otherKey = file('other.key', other.keyPem);
  const secret = plugin.keyPem.split('\n')[1] as string;
  const broken = file('broken.key', `-----BEGIN PRIVATE KEY-----\n${secret.slice(0, 20)}!!\n-----END PRIVATE KEY-----\n`);
  const missing = path.join(dir, 'none.key');
  const cases: Array<[Parameters<typeof clientTls>[1], NodeJS.ProcessEnv, string]> = [
    [{ certFile: cert }, {}, 'connect: --cert-file and --key-file go together'],
    [{}, { [CLIENT_KEY_ENV]: key }, 'connect: --cert-file and --key-file go together'],
    [{ caFile: key }, {}, `connect: --ca-file: ${key} holds no PEM certificate`],
    [{}, { [GATEWAY_CA_ENV]: missing }, `connect: ${GATEWAY_CA_ENV}: cannot read ${missing}: no such file or directory`],
    [{ certFile: cert, keyFile: dir }, {}, `connect: --key-file: cannot read ${dir}: is a directory`],
    [{ certFile: cert, keyFile: broken }, {}, `connect: --key-file: ${broken} holds no unencrypted PEM private key`],
    [{ certFile: cert, keyFile: cert }, {}, `connect: --key-file: ${cert} holds no unencrypted PEM private key`],
    [{ certFile: key, keyFile: key }, {}, `connect: --cert-file: ${key} holds no PEM certificate`],
    [{ certFile: cert, keyFile: otherKey }, {}, `connect: --key-file: ${otherKey} is not the private key of the certificate in --cert-file`],
    [
      { certFile: cert },
      { [CLIENT_KEY_ENV]: plugin.keyPem },
      `connect: ${CLIENT_KEY_ENV}: the value is PEM text, not a file's path: write it to a file and give that file's path`,
    ],
  ];
  for (const [flags, env, want] of cases) {
    assert.throws(
      () => clientTls(URL, flags, env),
      (error: unknown) => error instanceof HandshakeError && error.message === want && !error.message.includes(secret.slice(0, 20)),
      want,
    );
  }
  assert.throws(() => clientTls('ws://gateway.example/', { caFile: cert }, {}), /need a wss:\/\/ --url/);
  assert.equal(clientTls(URL, {}, {}), undefined, 'no file: Node\'s roots');
  assert.deepEqual(clientTls(URL, { certFile: cert, keyFile: key }, {}), { cert: plugin.certPem, key: plugin.keyPem });
});

test("a gateway's alert about the client certificate is said in words", () => {
  const alert = (code: string): string | undefined => alertRefusal(Object.assign(new Error('…:SSL alert number 116\n'), { code }));
  assert.equal(alert('ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED'), 'TLS: the gateway requires a client certificate and got none (--cert-file and --key-file)');
  assert.equal(alert('ERR_SSL_TLSV1_ALERT_UNKNOWN_CA'), "TLS: the gateway does not trust this plugin's client certificate: no CA it trusts signed it");
  assert.equal(alert('ERR_SSL_SSLV3_ALERT_CERTIFICATE_EXPIRED'), "TLS: this plugin's client certificate has expired: the gateway refused it");
  assert.equal(alert('ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE'), 'TLS: the gateway refused the handshake (bad certificate)');
  assert.equal(alert('ECONNREFUSED'), undefined);
});
