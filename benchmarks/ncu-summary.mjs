// Summarises an Nsight Compute CSV of benchmarks/grouped-gemm-profile.mjs (scripts/device-session.sh
// step `ncu`) as a markdown table: per (shape, product) the profiled launch's duration, SM clock,
// speed-of-light figures, L2 hit rate, IPC, cycles per issued instruction and ncu's top stall rule
// (two rows for the B-resident dW: its kernel and the general one over the large groups).
//   node benchmarks/ncu-summary.mjs ncu-grouped-gemm.csv[.gz]
// MOE_EP_GG_SHAPES=0,2,4 and MOE_EP_GG_PRODUCTS=NN,TN: the shapes and products the profile ran (as
// given to grouped-gemm-profile.mjs).
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';

import { shapes } from './grouped-gemm-shapes.mjs';

const file = process.argv[2];
const only = process.env.MOE_EP_GG_SHAPES;
const profiled = only ? only.split(',').map((i) => shapes[Number(i)]) : shapes;
if (!file) {
  console.error('usage: node benchmarks/ncu-summary.mjs <ncu csv[.gz]>');
  process.exit(2);
}
const raw = readFileSync(file);
const text = (file.endsWith('.gz') ? gunzipSync(raw) : raw).toString('utf8');

/** One CSV line of quoted fields ("" escapes a quote). */
function fields(line) {
  const out = [];
  let cur = '';
  let quoted = false;
  for (let i = 0; i < line.length; i++) {
    const ch = line[i];
    if (quoted) {
      if (ch === '"' && line[i + 1] === '"') ((cur += '"'), i++);
      else if (ch === '"') quoted = false;
      else cur += ch;
    } else if (ch === '"') quoted = true;
    else if (ch === ',') (out.push(cur), (cur = ''));
    else cur += ch;
  }
  out.push(cur);
  return out;
}

const lines = text.split('\n').filter((l) => l.startsWith('"'));
const header = fields(lines[0]);
const col = (name) => header.indexOf(name);
const launches = new Map(); // ID → { kernel, metrics: Map(section|metric → value), rules: [] }
for (const line of lines.slice(1)) {
  const f = fields(line);
  const id = f[col('ID')];
  if (!launches.has(id)) launches.set(id, { kernel: f[col('Kernel Name')], metrics: new Map(), rules: [] });
  const l = launches.get(id);
  const metric = f[col('Metric Name')];
  if (metric) l.metrics.set(`${f[col('Section Name')]}|${metric}`, f[col('Metric Value')]);
  const speedup = f[col('Estimated Speedup')];
  if (f[col('Rule Name')] && speedup) l.rules.push({ speedup: Number(speedup), text: f[col('Rule Description')] });
}

const num = (v) => Number(String(v ?? '').replace(/,/g, ''));
const sol = 'GPU Speed Of Light Throughput';
// The products the profile ran per shape, in its order (MOE_EP_GG_PRODUCTS, as grouped-gemm-profile.mjs).
const tags = process.env.MOE_EP_GG_PRODUCTS?.split(',') ?? ['NN', 'NT', 'TN'];
const productName = { NN: 'forward NN', NT: 'dA NT', TN: 'dW TN', TN32: 'dW TN fp32' };
// A call is one launch, or two for the B-resident dW: its kernel, then hopper.cu's over the groups of
// over 128 rows (grouped_gemm.cc; with none it finds no work). Each product is called twice: the
// second call is the profiled one.
const calls = [];
for (const l of launches.values()) {
  const last = calls.at(-1);
  if (last && /dw_b_resident/.test(last.at(-1).kernel) && /grouped_gemm_wgmma/.test(l.kernel)) last.push(l);
  else calls.push([l]);
}
const rows = calls.filter((_, i) => i % 2 === 1).flatMap((call, j) => call.map((l) => ({ l, j })));
const kernelTag = (k) => (/dw_b_resident/.test(k) ? 'B-resident' : /wgmma/.test(k) ? 'wgmma' : 'mma.sync');
console.log('| shape | product | kernel | ms | SM MHz | SM % | DRAM % | L2 % | L2 hit % | IPC | cycles/issue | top stall (ncu rule) |');
console.log('|---|---|---|---|---|---|---|---|---|---|---|---|');
rows.forEach(({ l, j }) => {
  const shape = profiled[Math.floor(j / tags.length)]?.name ?? '?';
  const m = (section, name) => l.metrics.get(`${section}|${name}`);
  const top = l.rules.sort((a, b) => b.speedup - a.speedup)[0];
  const stall = top
    ? (top.text.match(/stalled (waiting [^.]*?|on [^.]*?)(\.| operation)/)?.[1] ?? top.text.slice(0, 60)).replace(/\s+/g, ' ')
    : '';
  const stallCycles = top?.text.match(/spends ([\d.]+) cycles/)?.[1];
  console.log(
    `| ${shape} | ${productName[tags[j % tags.length]]} | ${kernelTag(l.kernel)} | ${(num(m(sol, 'Duration')) / 1e6).toFixed(3)} | ` +
      `${(num(m(sol, 'SM Frequency')) / 1e6).toFixed(0)} | ${m(sol, 'Compute (SM) Throughput')} | ${m(sol, 'DRAM Throughput')} | ` +
      `${m(sol, 'L2 Cache Throughput')} | ${m('Memory Workload Analysis', 'L2 Hit Rate')} | ${m('Compute Workload Analysis', 'Executed Ipc Active')} | ` +
      `${m('Warp State Statistics', 'Warp Cycles Per Issued Instruction')} | ${stallCycles ? `${stallCycles} cycles ` : ''}${stall} |`,
  );
});
