/**
 * What refusing NaN and ±Infinity costs `encodeJson` (src/wirejson.ts), against lossless-json
 * alone and the other ways it could be done; then what its search for a lone surrogate costs
 * on a 1 KB and a 1 MB result. After ./build.sh: node bench/encode-json.js
 * Each case timed 15 times, interleaved, the best kept (the machine is shared).
 */
const { stringify } = require('lossless-json');
const { holdsLoneSurrogate, jsonText } = require('../dist/wirejson.js');

const refuse = [
  {
    test: (value) => (typeof value === 'number' || value instanceof Number) && !Number.isFinite(Number(value)),
    stringify: (value) => {
      throw new Error(`${Number(value)} is not a JSON number`);
    },
  },
];
const ways = {
  'lossless-json alone': (value) => Buffer.from(stringify(value) ?? 'null'),
  'its numberStringifiers refusing': (value) => Buffer.from(stringify(value, undefined, undefined, refuse) ?? 'null'),
  'those again if "null"': (value) => {
    const text = stringify(value) ?? 'null';
    if (text.includes('null')) stringify(value, undefined, undefined, refuse);
    return Buffer.from(text);
  },
  'encodeJson (a walk if "null")': (value) => Buffer.from(jsonText(value)),
};
const rows = (s) => Array.from({ length: 10_000 }, (_, i) => ({ i, x: i * 0.5, s: s(i), tags: ['a', 'b'] }));
const cases = [
  ['10,000 rows', rows((i) => `row${i}`), 20],
  ['10,000 rows holding null', rows(() => null), 20],
  ['a small object', { text: 'hi', n: 3 }, 20_000],
  ['a small object holding null', { text: 'hi', n: null }, 20_000],
];
for (const [name, value, repeats] of cases) {
  const best = new Map(Object.keys(ways).map((way) => [way, Infinity]));
  for (let round = 0; round < 15; round++) {
    for (const [way, encode] of Object.entries(ways)) {
      const start = process.hrtime.bigint();
      for (let i = 0; i < repeats; i++) encode(value);
      best.set(way, Math.min(best.get(way), Number(process.hrtime.bigint() - start) / repeats / 1000));
    }
  }
  const shown = [...best].map(([way, us]) => `${way} ${us >= 1000 ? `${(us / 1000).toFixed(1)} ms` : `${us.toFixed(2)} µs`}`);
  console.log(`${name}: ${shown.join(', ')}`);
}

// The lone-surrogate search alone, on the text encodeJson wrote: results of about 1 KB and
// 1 MB (strings with accents and emoji, written raw), and text holding 20,000 backslashes of
// its own followed by "ud" (each found by the search, then passed over).
const record = (i) => ({ id: i, name: `customer ${i}`, city: 'Zürich', note: 'ünïcødé 😀 ok', score: i * 0.5 });
const about = (bytes) => {
  const rows = [];
  while (JSON.stringify(rows).length < bytes) rows.push(record(rows.length));
  return { rows };
};
const texts = [
  ['a 1 KB result', jsonText(about(1024)), 20_000],
  ['a 1 MB result', jsonText(about(1024 * 1024)), 20],
  ['20,000 backslash + "ud"', jsonText(Array.from({ length: 20_000 }, (_, i) => `C:\\users\\ud${i}`)), 20],
];
for (const [name, text, repeats] of texts) {
  let encode = Infinity;
  let search = Infinity;
  for (let round = 0; round < 15; round++) {
    let start = process.hrtime.bigint();
    for (let i = 0; i < Math.max(1, repeats / 10); i++) stringify(JSON.parse(text));
    encode = Math.min(encode, Number(process.hrtime.bigint() - start) / Math.max(1, repeats / 10) / 1000);
    start = process.hrtime.bigint();
    for (let i = 0; i < repeats; i++) if (holdsLoneSurrogate(text)) throw new Error('no lone surrogate here');
    search = Math.min(search, Number(process.hrtime.bigint() - start) / repeats / 1000);
  }
  const us = (n) => (n >= 1000 ? `${(n / 1000).toFixed(2)} ms` : `${n.toFixed(2)} µs`);
  console.log(`${name} (${text.length} characters): lossless-json ${us(encode)}, the lone-surrogate search ${us(search)}`);
}
