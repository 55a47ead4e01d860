import assert from 'node:assert/strict';
import { test } from 'node:test';
import { decodeJson } from '#internal/server';
import { MAX_DEPTH, shownName, unusable } from '#internal/wirejson';

const deep = (n: number): string => '['.repeat(n) + ']'.repeat(n);

test('values every SDK holds pass', () => {
  for (const text of ['{"a": [1, 2.5e3, -0.0, "\\ud83d\\ude00", "\\"[{"]}', deep(MAX_DEPTH), '1.7976931348623157e308',
    '1e308', `1${'0'.repeat(300)}e-100`, '1e-400', '-2.5E+0300', '9'.repeat(300), '"\\u00e9\\u00E9"']) {
    assert.equal(unusable(Buffer.from(text)), undefined, text.slice(0, 40));
  }
});

test('what other SDKs cannot hold is invalid_params, without quoting it', () => {
  const cases: [Buffer | string, string][] = [
    [deep(MAX_DEPTH + 1), 'nested deeper than 250'],
    [deep(100_000), 'nested deeper than 250'],
    ['1e400', 'beyond the range of a double'],
    ['[-1E+400]', 'beyond the range of a double'],
    ['9'.repeat(5000), 'beyond the range of a double'],
    // Digits and exponent together: each alone stays under what a double holds.
    [`1${'0'.repeat(250)}e100`, 'beyond the range of a double'],
    ['0.5e309', 'beyond the range of a double'],
    ['"\\ud800"', 'lone surrogate'],
    ['["\\udc00"]', 'lone surrogate'],
    [Buffer.from([0x22, 0xff, 0x22]), 'not UTF-8'],
  ];
  for (const [raw, why] of cases) {
    assert.throws(
      () => decodeJson(Buffer.from(raw), 'params'),
      (error: Error & { type?: string }) => error.message.includes(why) && error.message.length < 200,
    );
  }
});

test('a long method name is cut and escaped', () => {
  assert.ok(shownName('x'.repeat(10_000)).length < 80);
  assert.equal(shownName('a\u0000\nb'), '"a\\u0000\\nb"');
});
