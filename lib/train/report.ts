/**
 * The HTML report of a training run: loss and MaxVio over steps, and a heatmap of tokens per
 * expert over steps for each MoE layer (expert choice: also the fraction of tokens that got 0, 1,
 * 2, … experts over steps). Self-contained (Apache ECharts is inlined from the
 * installed package), so it opens offline and can be archived with the run.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';

import { type StepMetrics } from './metrics.js';

export interface ReportInput {
  title: string;
  config: unknown;
  steps: StepMetrics[];
  summary: Record<string, string | number>;
}

function escapeHtml(s: string): string {
  return s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c] as string);
}

export function renderReport(input: ReportInput): string {
  const echarts = readFileSync(createRequire(import.meta.url).resolve('echarts/dist/echarts.min.js'), 'utf8');
  const steps = input.steps.map((s) => s.step);
  const layers = input.steps[0]?.layers.length ?? 0;
  // Heatmap data per layer: [step index, expert, tokens]; at most ~300 step columns (sampled).
  const stride = Math.max(1, Math.ceil(input.steps.length / 300));
  const sampled = input.steps.filter((_, i) => i % stride === 0);
  const heat = Array.from({ length: layers }, (_, l) =>
    sampled.flatMap((s, i) => (s.layers[l]?.tokensPerExpert ?? []).map((v, e) => [i, e, v])),
  );
  const data = {
    steps,
    loss: input.steps.map((s) => s.loss),
    maxVio: Array.from({ length: layers }, (_, l) => input.steps.map((s) => s.layers[l]?.maxVio ?? null)),
    dropped: Array.from({ length: layers }, (_, l) => input.steps.map((s) => s.layers[l]?.dropped ?? null)),
    heatSteps: sampled.map((s) => s.step),
    heat,
    experts: input.steps[0]?.layers[0]?.tokensPerExpert.length ?? 0,
    // Expert choice: [step index, experts n, fraction of the step's tokens with n experts] per layer.
    perToken: Array.from({ length: layers }, (_, l) =>
      sampled.flatMap((s, i) => {
        const h = s.layers[l]?.expertsPerToken ?? [];
        const total = h.reduce((a, b) => a + b, 0) || 1;
        return h.map((v, n) => [i, n, +(v / total).toFixed(4)]);
      }),
    ),
  };
  const perTokenDivs = data.perToken.map((p, l) => (p.length ? `<h2>Experts per token (fraction of tokens), layer ${l}</h2><div class="chart" id="ept${l}"></div>` : '')).join('');
  const rows = Object.entries(input.summary)
    .map(([k, v]) => `<tr><th>${escapeHtml(k)}</th><td>${escapeHtml(String(v))}</td></tr>`)
    .join('');
  const heatDivs = Array.from({ length: layers }, (_, l) => `<h2>Tokens per expert, layer ${l}</h2><div class="chart tall" id="heat${l}"></div>`).join('');
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${escapeHtml(input.title)}</title>
<style>body{font:14px system-ui,sans-serif;margin:24px;max-width:1100px}table{border-collapse:collapse}th,td{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd}
.chart{height:320px;margin-bottom:24px}.tall{height:380px}pre{background:#f6f6f6;padding:8px;overflow:auto}</style>
<script>${echarts}</script></head><body>
<h1>${escapeHtml(input.title)}</h1>
<table>${rows}</table>
<h2>Loss</h2><div class="chart" id="loss"></div>
<h2>MaxVio (max load / mean load − 1) and dropped fraction</h2><div class="chart" id="maxvio"></div>
${heatDivs}
${perTokenDivs}
<h2>Configuration</h2><pre>${escapeHtml(JSON.stringify(input.config, null, 2))}</pre>
<script>
const d = ${JSON.stringify(data)};
const line = (id, series, yName, log) => echarts.init(document.getElementById(id)).setOption({
  animation: false, tooltip: { trigger: 'axis' }, legend: {}, grid: { left: 60, right: 30 },
  xAxis: { type: 'category', data: d.steps, name: 'step' }, yAxis: { type: log ? 'log' : 'value', name: yName },
  series: series.map(([name, data]) => ({ name, type: 'line', data, showSymbol: false })) });
line('loss', [['loss', d.loss]], 'loss', true);
line('maxvio', [...d.maxVio.map((v, l) => ['MaxVio layer ' + l, v]), ...d.dropped.map((v, l) => ['dropped layer ' + l, v])], '');
d.heat.forEach((data, l) => {
  const max = Math.max(1, ...data.map((x) => x[2]));
  echarts.init(document.getElementById('heat' + l)).setOption({
    animation: false, tooltip: { position: 'top' }, grid: { left: 60, right: 30, bottom: 80 },
    xAxis: { type: 'category', data: d.heatSteps, name: 'step' }, yAxis: { type: 'category', data: [...Array(d.experts).keys()], name: 'expert' },
    visualMap: { min: 0, max, calculable: true, orient: 'horizontal', left: 'center', bottom: 0 },
    series: [{ type: 'heatmap', data, progressive: 0 }] });
});
d.perToken.forEach((data, l) => {
  if (!data.length) return;
  const top = Math.max(...data.map((x) => x[1]));
  echarts.init(document.getElementById('ept' + l)).setOption({
    animation: false, tooltip: { position: 'top' }, grid: { left: 60, right: 30, bottom: 80 },
    xAxis: { type: 'category', data: d.heatSteps, name: 'step' }, yAxis: { type: 'category', data: [...Array(top + 1).keys()], name: 'experts' },
    visualMap: { min: 0, max: 1, calculable: true, orient: 'horizontal', left: 'center', bottom: 0 },
    series: [{ type: 'heatmap', data, progressive: 0 }] });
});
</script></body></html>
`;
}

export function writeReport(path: string, input: ReportInput): void {
  writeFileSync(path, renderReport(input));
}
