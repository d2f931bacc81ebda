#!/usr/bin/env node
// docs/report.png from a run folder, without a browser: the report's own charts (reportCharts, the
// options report.html draws) rendered by ECharts on the server as SVG, laid out two to a row, and
// rasterised by resvg (a devDependency). Usage, after `npm run build:ts`:
//   node dist/lib/cli/main.js train --out /tmp/run && node scripts/report-picture.mjs /tmp/run docs/report.png
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

import { Resvg } from '@resvg/resvg-js';
import * as echarts from 'echarts';

import { readMetrics } from '../dist/lib/train/metrics.js';
import { reportCharts } from '../dist/lib/train/report.js';

const [runDir, outPath = 'docs/report.png'] = process.argv.slice(2);
if (!runDir) {
  console.error('usage: node scripts/report-picture.mjs <run folder> [out.png]');
  process.exit(2);
}
const steps = readMetrics(join(runDir, 'metrics.jsonl'));
const config = JSON.parse(readFileSync(join(runDir, 'config.json'), 'utf8'));
const charts = reportCharts(steps);
// The picture shows these, two to a row; report.html has them all.
const chosen = ['loss', 'maxvio', 'load0', 'bias0', 'gradnorm', 'tps'].map((id) => charts.find((c) => c.id === id)).filter(Boolean);

const W = 620;
const margin = 20;
const heading = 26;
const esc = (s) => s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]);
const first = steps[0];
const last = steps[steps.length - 1];
const m = config.model;
const parts = [
  `<text x="${margin}" y="40" font-size="24" font-weight="bold">moe-ep train: report.html</text>`,
  `<text x="${margin}" y="68" font-size="15" fill="#333">${esc(
    `${m.layers} MoE layers, ${m.experts} experts top-${m.topK}, hidden ${m.hidden}; ${steps.length} steps of ${config.data.tokensPerStep} tokens; ` +
      `loss ${first.loss.toFixed(3)} → ${last.loss.toFixed(4)}, MaxVio ${Math.max(...first.layers.map((l) => l.maxVio)).toFixed(2)} → ${Math.max(...last.layers.map((l) => l.maxVio)).toFixed(2)}`,
  )}</text>`,
];
let y = 90;
for (let i = 0; i < chosen.length; i += 2) {
  const row = chosen.slice(i, i + 2);
  const h = Math.max(...row.map((c) => c.height));
  row.forEach((c, j) => {
    const chart = echarts.init(null, null, { renderer: 'svg', ssr: true, width: W, height: h });
    chart.setOption(c.option);
    const svg = chart.renderToSVGString();
    chart.dispose();
    const x = margin + j * (W + margin);
    // Headings are shortened to what fits above a chart of this width.
    const title = c.title.replace(/ \(.*$/, '').replace(/: max load.*$/, '');
    parts.push(`<text x="${x}" y="${y + 18}" font-size="16" font-weight="bold">${esc(title)}</text>`);
    parts.push(svg.replace('<svg ', `<svg x="${x}" y="${y + heading}" `));
  });
  y += heading + h + 10;
}
const width = 2 * W + 3 * margin;
const page = `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${y}" font-family="DejaVu Sans, sans-serif"><rect width="100%" height="100%" fill="#fff"/>${parts.join('')}</svg>`;
const png = new Resvg(page, { font: { loadSystemFonts: true, defaultFontFamily: 'DejaVu Sans' } }).render().asPng();
writeFileSync(outPath, png);
console.log(`${outPath}: ${width}×${y}, ${(png.length / 1024).toFixed(0)} KiB, from ${steps.length} steps in ${runDir}`);
