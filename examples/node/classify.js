#!/usr/bin/env node
// Classify inputs with an onnx-pipeline bundle in Node.js, using onnxruntime-node (CPU).
//
//   npm ci --onnxruntime-node-install=skip   # the CPU binaries ship inside the package
//   node classify.js BUNDLE_DIR [SAMPLES_JSON]
//
// BUNDLE_DIR is what `pipeline package` wrote (model.onnx, model.json, samples.json). SAMPLES_JSON
// (default: the bundle's samples.json) holds raw inputs in the same format. Everything about the
// model (input name, dtype, preprocessing, labels, outputs) is read from model.json. Prints the same
// lines as examples/python/classify.py: index, predicted label, confidence, true label; then a
// summary. Exits 1 when an output differs from the one the bundle recorded (the self-check).
'use strict';

const fs = require('fs');
const path = require('path');
const ort = require('onnxruntime-node');

const BATCH = 256;
const ARRAYS = {
  float32: Float32Array, float64: Float64Array, uint8: Uint8Array, int8: Int8Array, uint16: Uint16Array,
  int16: Int16Array, int32: Int32Array, uint32: Uint32Array, int64: BigInt64Array, uint64: BigUint64Array,
};

// Raw values (flat, row-major, shape [n, ...]) -> what the model takes, as model.json says.
function preprocess(flat, shape, meta) {
  const pre = meta.preprocessing;
  const dtype = meta.input.dtype;
  const Out = ARRAYS[dtype];
  if (!Out) throw new Error(`input dtype ${dtype} is not handled by this example`);
  const out = new Out(flat.length);
  const big = dtype === 'int64' || dtype === 'uint64';
  if (pre.applied_in_graph || !('mean' in pre)) {
    for (let i = 0; i < flat.length; i++) out[i] = big ? BigInt(flat[i]) : flat[i];
    return out; // the graph normalizes (or nothing to do)
  }
  // (x - mean) / std in float32; mean/std are scalars or one value per entry of axis 1.
  const perAxis = Array.isArray(pre.mean);
  const inner = shape.slice(2).reduce((a, b) => a * b, 1);
  const axis1 = shape[1];
  for (let i = 0; i < flat.length; i++) {
    const c = perAxis ? Math.floor(i / inner) % axis1 : 0;
    const mean = Math.fround(perAxis ? pre.mean[c] : pre.mean);
    const std = Math.fround(perAxis ? pre.std[c] : pre.std);
    out[i] = Math.fround(Math.fround(Math.fround(flat[i]) - mean) / std);
  }
  return out;
}

function close(a, b, atol, rtol) {
  return a.length === b.length && a.every((v, i) => Math.abs(v - b[i]) <= atol + rtol * Math.abs(b[i]));
}

async function main(argv) {
  if (argv.length === 0 || argv[0] === '-h' || argv[0] === '--help') {
    console.log('usage: node classify.js BUNDLE_DIR [SAMPLES_JSON]');
    return argv.length ? 0 : 2;
  }
  const bundle = argv[0];
  const meta = JSON.parse(fs.readFileSync(path.join(bundle, 'model.json'), 'utf8'));
  const data = JSON.parse(fs.readFileSync(argv[1] || path.join(bundle, 'samples.json'), 'utf8'));
  const samples = data.samples;
  const session = await ort.InferenceSession.create(path.join(bundle, meta.model.file),
    { executionProviders: ['cpu'] });

  const names = meta.outputs.map((o) => o.name);
  const scoresName = ['logits', 'probabilities'].find((n) => names.includes(n)) || names[0];
  const perSample = data.input.shape.slice(1);
  const size = perSample.reduce((a, b) => a * b, 1);
  const outputs = Object.fromEntries(names.map((n) => [n, []])); // per sample: a plain array
  for (let start = 0; start < samples.length; start += BATCH) {
    const batch = samples.slice(start, start + BATCH);
    const shape = [batch.length, ...perSample];
    const flat = batch.flatMap((s) => s.input.flat(Infinity));
    const x = new ort.Tensor(meta.input.dtype, preprocess(flat, shape, meta), shape);
    const result = await session.run({ [meta.input.name]: x });
    for (const n of names) {
      const t = result[n];
      const width = t.dims.slice(1).reduce((a, b) => a * b, 1);
      for (let i = 0; i < batch.length; i++) outputs[n].push(Array.from(t.data.slice(i * width, (i + 1) * width), Number));
    }
  }

  const labels = meta.labels;
  const tol = data.tolerance || { atol: 1e-4, rtol: 1e-3 };
  console.log(`# ${path.basename(path.resolve(bundle))}: ${samples.length} inputs, onnxruntime-node ${ort.env.versions.node} (node)`);
  let correct = 0;
  let agree = 0;
  samples.forEach((s, i) => {
    const scores = outputs[scoresName][i];
    const k = scores.indexOf(Math.max(...scores));
    let conf = scores[k];
    if (scoresName !== 'probabilities') {
      const sum = scores.reduce((acc, v) => acc + Math.exp(v - scores[k]), 0);
      conf = 1 / sum; // softmax of the top score
    }
    const truth = s.label !== undefined ? s.label : '-';
    if (labels[k] === truth) correct += 1;
    const expected = (s.expected && s.expected.outputs) || {};
    if (Object.entries(expected).every(([n, v]) => close(outputs[n][i], v.flat(Infinity), tol.atol, tol.rtol))) agree += 1;
    console.log(`${s.index !== undefined ? s.index : i}\t${labels[k]}\t${conf.toFixed(3)}\t${truth}`);
  });
  console.log(`accuracy ${(correct / samples.length).toFixed(4)} (${correct}/${samples.length}); `
    + `self-check: ${agree}/${samples.length} match the bundle's expected outputs`);
  return agree === samples.length ? 0 : 1;
}

main(process.argv.slice(2)).then((code) => { process.exitCode = code; }, (err) => {
  console.error(`error: ${err.message}`);
  process.exitCode = 1;
});
