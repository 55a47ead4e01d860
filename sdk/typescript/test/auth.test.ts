/** The bearer token: what it admits, where it comes from, and a server that requires it. */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { inspect } from 'node:util';
import { test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { BearerToken, Plugin, PluginServer, TOKEN_ENV, TOKEN_FILE_ENV } from '@linchkit/plugin-sdk';
import { protoPath } from '#internal/server';

test('admits only the token, and never shows it', () => {
  const token = new BearerToken(' s3cret\n');
  assert.ok(token.admits('Bearer s3cret'));
  assert.ok(token.admits('bearer  s3cret '));
  for (const wrong of ['Bearer s3cret2', 'Bearer s3cre', 'Basic s3cret', 's3cret', '', 'Bearer s3crét']) {
    assert.equal(token.admits(wrong), false, wrong);
  }
  assert.equal(token.admits(undefined), false);
  assert.ok(!inspect(token).includes('s3cret'));
  assert.ok(!String(token).includes('s3cret'));
});

test('admits exactly one authorization header that carries the token', () => {
  const token = new BearerToken('s3cret');
  assert.ok(token.admitsHeaders(['Bearer s3cret']));
  // The first right and another after it: Node's request.headers kept only the first.
  for (const sent of [undefined, [], ['Bearer s3cret', 'Bearer wrong'], ['Bearer s3cret', 'Bearer s3cret'], ['Bearer wrong', 'Bearer s3cret']]) {
    assert.equal(token.admitsHeaders(sent), false, JSON.stringify(sent));
  }
});

test('reads one source', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'lk-token-'));
  try {
    const file = path.join(dir, 'token');
    writeFileSync(file, 'from-file\n');
    assert.equal(BearerToken.configured({}), undefined);
    assert.ok(BearerToken.configured({ [TOKEN_FILE_ENV]: file })!.admits('Bearer from-file'));
    assert.ok(BearerToken.configured({ [TOKEN_ENV]: 's3cret' })!.admits('Bearer s3cret'));
    assert.throws(() => BearerToken.configured({ [TOKEN_FILE_ENV]: file, [TOKEN_ENV]: 's3cret' }), (error: Error) =>
      error.message.includes('not both') && !error.message.includes('s3cret'),
    );
    assert.throws(() => BearerToken.configured({ [TOKEN_FILE_ENV]: path.join(dir, 'missing') }));
    assert.throws(() => BearerToken.configured({ [TOKEN_ENV]: 'a b' }));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a server with a token refuses an RPC without it (health: tests/conformance)', async () => {
  const plugin = new Plugin({ id: 'test', version: '0.1.0' });
  plugin.method('echo', (params: unknown) => params);
  const server = new PluginServer(plugin, { servingFromStart: true, token: new BearerToken('s3cret') });
  const port = await server.bind('127.0.0.1:0', grpc.ServerCredentials.createInsecure());
  const definition = grpc.loadPackageDefinition(
    protoLoader.loadSync(protoPath(), { keepCase: true, longs: Number, defaults: true, oneofs: true }),
  ) as any;
  const client = new definition.linchkit.plugin.v1.PluginService(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  const describe = (authorization?: string): Promise<any> =>
    new Promise((resolve, reject) => {
      const metadata = new grpc.Metadata();
      if (authorization !== undefined) metadata.set('authorization', authorization);
      client.Describe({}, metadata, { deadline: Date.now() + 5000 }, (error: Error | null, reply: unknown) =>
        error ? reject(error) : resolve(reply),
      );
    });
  try {
    for (const authorization of [undefined, 'Bearer n0pe-value', 'Basic s3cret']) {
      await assert.rejects(describe(authorization), (error: grpc.ServiceError) =>
        error.code === grpc.status.UNAUTHENTICATED && !error.details.includes('n0pe'),
      );
    }
    assert.equal((await describe('Bearer s3cret')).id, 'test');
  } finally {
    client.close();
    await server.shutdown(1000);
  }
});
