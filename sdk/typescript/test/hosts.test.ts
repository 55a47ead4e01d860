import assert from 'node:assert/strict';
import { test } from 'node:test';

import { AttachedHosts, MAX_HOSTS } from '#internal/hosts';

// The bound on hosts holds while their Inits are still running (docs/protocol.md,
// "Several hosts on one service"): an init hook awaits, and other Inits arrive meanwhile.
test('Inits under way hold their places', () => {
  const hosts = new AttachedHosts();
  for (let index = 0; index < MAX_HOSTS; index += 1) assert.equal(hosts.join(`h${index}`), true);
  assert.equal(hosts.join('one-more'), false);
  assert.equal(hosts.join('h0'), true); // a host already holding a place may Init again
  hosts.joined('h0', true);
  hosts.joined('h0', false);
  hosts.joined('h1', false); // a failed Init gives its place back
  assert.equal(hosts.join('one-more'), true);
});

test('the last host to leave is told', () => {
  const hosts = new AttachedHosts();
  for (const host of ['a', 'b']) {
    assert.equal(hosts.join(host), true);
    hosts.joined(host, true);
  }
  assert.equal(hosts.othersStay('a'), true);
  assert.equal(hosts.othersStay('b'), false);
});
