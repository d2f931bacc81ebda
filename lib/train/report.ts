/**
 * The HTML report of a training run, built from every step of its metrics.jsonl (a resumed run's
 * too): loss, MaxVio, each expert's load relative to the mean (a diverging map: blue below the
 * mean, red above), under expert choice the fraction of tokens that got 0, 1, 2, … experts, each
 * expert's balancing bias (token choice), learning rate, gradient norm and throughput. Noisy
 * series are drawn smoothed (a centred moving average) over their raw values, drawn faint.
 * Self-contained (Apache ECharts is inlined from the installed package), so it opens offline and
 * can be archived with the run. The charts are plain ECharts options (reportCharts), which
 * scripts/report-picture.mjs also renders without a browser for docs/report.png.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

import { type StepMetrics } from './metrics.js';
import { writeFileAtomic } from './safe-files.js';

export interface ReportInput {
  title: string;
  config: unknown;
  steps: StepMetrics[];
  summary: Record<string, string | number>;
}

/** One chart: a heading, its height in pixels and its ECharts option (JSON: no functions). */
export interface ReportChart {
  id: string;
  title: string;
  height: number;
  option: Record<string, unknown>;
}

const PALETTE = ['#5470c6', '#91cc75', '#fac858', '#ee6666', '#73c0de', '#3ba272', '#fc8452', '#9a60b4', '#ea7ccc', '#2f4554'];
/** At most this many points per line (every step is kept up to it; longer runs are sampled evenly). */
const MAX_POINTS = 2000;
/** At most this many step columns in a load map. */
const MAX_COLUMNS = 300;

type Point = [number, number];

function escapeHtml(s: string): string {
  return s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c] as string);
}

/** Every `stride`-th element and the last one. */
function sample<T>(xs: T[], max: number): T[] {
  if (xs.length <= max) return xs;
  const stride = Math.ceil(xs.length / max);
  return xs.filter((_, i) => i % stride === 0 || i === xs.length - 1);
}

/** The smoothing window for n points: about n/50 of them (none for runs under 100 steps). */
export function smoothingWindow(n: number): number {
  return Math.max(1, Math.round(n / 50));
}

/**
 * A centred moving average over `window` points (fewer at the ends), which does not lag behind a
 * falling curve as an exponential average does; with `log`, of the logarithms (for log-scale axes).
 */
export function smooth(values: number[], window: number, log = false): number[] {
  const v = log ? values.map((x) => Math.log(Math.max(x, Number.MIN_VALUE))) : values;
  const prefix = [0];
  for (const x of v) prefix.push((prefix[prefix.length - 1] as number) + x);
  const half = Math.floor(window / 2);
  return v.map((_, i) => {
    const lo = Math.max(0, i - half);
    const hi = Math.min(v.length, i + half + 1);
    const mean = ((prefix[hi] as number) - (prefix[lo] as number)) / (hi - lo);
    return log ? Math.exp(mean) : mean;
  });
}

const axis = (name: string, log = false): Record<string, unknown> => ({ type: log ? 'log' : 'value', name, scale: !log });

/** A heatmap over step columns: `data` rows are [column, row, colour value, ...tooltip values]. */
function heatmapChart(
  id: string,
  title: string,
  steps: number[],
  rows: number,
  rowName: string,
  data: unknown[][],
  visualMap: Record<string, unknown>,
): ReportChart {
  return {
    id,
    title,
    height: Math.min(600, 140 + 22 * rows),
    option: {
      animation: false,
      tooltip: { position: 'top' },
      grid: { left: 70, right: 30, top: 30, bottom: 80 },
      xAxis: { type: 'category', data: steps, name: 'step' },
      yAxis: { type: 'category', data: Array.from({ length: rows }, (_, r) => r), name: rowName },
      visualMap: { dimension: 2, calculable: true, orient: 'horizontal', left: 'center', bottom: 0, ...visualMap },
      series: [{ type: 'heatmap', data, progressive: 0 }],
    },
  };
}

function lineChart(
  id: string,
  title: string,
  yName: string,
  lines: { name: string; points: Point[]; smooth?: boolean; dashed?: boolean }[],
  log = false,
): ReportChart {
  const series: Record<string, unknown>[] = [];
  lines.forEach((line, i) => {
    const color = PALETTE[i % PALETTE.length];
    const ys = line.points.map((p) => p[1]);
    const window = line.smooth ? smoothingWindow(ys.length) : 1;
    if (window > 1) {
      const s = smooth(ys, window, log);
      series.push({
        name: line.name,
        type: 'line',
        showSymbol: false,
        silent: true,
        data: sample(line.points, MAX_POINTS),
        lineStyle: { color, width: 1, opacity: 0.25 },
        itemStyle: { color },
      });
      series.push({
        name: line.name,
        type: 'line',
        showSymbol: false,
        data: sample(
          line.points.map((p, j): Point => [p[0], s[j] as number]),
          MAX_POINTS,
        ),
        lineStyle: { color, width: 2 },
        itemStyle: { color },
      });
    } else {
      series.push({
        name: line.name,
        type: 'line',
        showSymbol: false,
        data: sample(line.points, MAX_POINTS),
        lineStyle: { color, width: 1.5, ...(line.dashed ? { type: 'dashed' } : {}) },
        itemStyle: { color },
      });
    }
  });
  return {
    id,
    title,
    height: 280,
    option: {
      animation: false,
      tooltip: { trigger: 'axis' },
      // One line needs no legend (its name is the chart's).
      ...(lines.length > 1 ? { legend: { type: 'scroll', bottom: 0 } } : {}),
      grid: { left: 70, right: 30, top: 30, bottom: lines.length > 1 ? 60 : 30 },
      xAxis: { type: 'value', name: 'step', min: 'dataMin', max: 'dataMax' },
      yAxis: axis(yName, log),
      series,
    },
  };
}

/** The charts of a report, in order. */
export function reportCharts(steps: StepMetrics[]): ReportChart[] {
  const charts: ReportChart[] = [];
  const layers = steps[0]?.layers.length ?? 0;
  const experts = steps[0]?.layers[0]?.tokensPerExpert.length ?? 0;
  const points = (f: (s: StepMetrics) => number | undefined): Point[] =>
    steps.flatMap((s): Point[] => {
      const v = f(s);
      return v === undefined || !Number.isFinite(v) ? [] : [[s.step, v]];
    });
  const noisy =
    smoothingWindow(steps.length) > 1 ? ` (a moving average over ${smoothingWindow(steps.length)} steps; raw values faint)` : '';

  charts.push(lineChart('loss', `Loss${noisy}`, 'loss', [{ name: 'loss', points: points((s) => s.loss), smooth: true }], true));
  if (steps.some((s) => s.accuracy !== undefined))
    charts.push(
      lineChart('accuracy', `Accuracy${noisy}`, 'accuracy', [{ name: 'accuracy', points: points((s) => s.accuracy), smooth: true }]),
    );
  const dropped = steps.some((s) => s.layers.some((l) => l.dropped > 0));
  charts.push(
    lineChart('maxvio', `MaxVio: max load / mean load − 1${dropped ? ', and the dropped fraction (dashed)' : ''}${noisy}`, '', [
      ...Array.from({ length: layers }, (_, l) => ({
        name: `MaxVio layer ${l}`,
        points: points((s) => s.layers[l]?.maxVio),
        smooth: true,
      })),
      ...(dropped
        ? Array.from({ length: layers }, (_, l) => ({
            name: `dropped layer ${l}`,
            points: points((s) => s.layers[l]?.dropped),
            dashed: true,
          }))
        : []),
    ]),
  );

  // Load relative to the mean per expert and step: 1 is even; the colours are symmetric around it.
  const columns = sample(steps, MAX_COLUMNS);
  for (let l = 0; l < layers; l++) {
    const data = columns.flatMap((s, i) => {
      const load = s.layers[l]?.tokensPerExpert ?? [];
      const mean = load.reduce((a, b) => a + b, 0) / Math.max(1, load.length);
      return load.map((v, e) => {
        const ratio = mean > 0 ? v / mean : 1;
        // [column, expert, colour value clamped to the scale, tokens, exact ratio] (the last two for the tooltip).
        return [i, e, Math.min(2, ratio), v, Number(ratio.toFixed(3))];
      });
    });
    charts.push(
      heatmapChart(
        `load${l}`,
        `Load per expert relative to the mean, layer ${l} (1 = even; 2 or more is the darkest red)`,
        columns.map((s) => s.step),
        experts,
        'expert',
        data,
        {
          min: 0,
          max: 2,
          text: ['above the mean', 'below'],
          inRange: { color: ['#2166ac', '#67a9cf', '#d1e5f0', '#f7f7f7', '#fddbc7', '#ef8a62', '#b2182b'] },
        },
      ),
    );
  }

  // Expert choice: how many experts each token got (0 is a token no expert took), as a fraction of the step's tokens.
  for (let l = 0; l < layers; l++) {
    if (!steps.some((s) => s.layers[l]?.expertsPerToken !== undefined)) continue;
    const rows = Math.max(...columns.map((s) => s.layers[l]?.expertsPerToken?.length ?? 0));
    const data = columns.flatMap((s, i) => {
      const h = s.layers[l]?.expertsPerToken ?? [];
      const total = h.reduce((a, b) => a + b, 0) || 1;
      // [column, experts n, fraction of the step's tokens with n experts, tokens] (the last for the tooltip).
      return h.map((v, n) => [i, n, Number((v / total).toFixed(4)), v]);
    });
    charts.push(
      heatmapChart(
        `ept${l}`,
        `Experts per token (fraction of tokens), layer ${l}`,
        columns.map((s) => s.step),
        rows,
        'experts',
        data,
        {
          min: 0,
          max: 1,
          inRange: { color: ['#f7fbff', '#c6dbef', '#6baed6', '#2171b5', '#08306b'] },
        },
      ),
    );
  }

  if (steps.some((s) => s.layers[0]?.bias !== undefined)) {
    for (let l = 0; l < layers; l++) {
      charts.push(
        lineChart(
          `bias${l}`,
          `Balancing bias per expert, layer ${l} (added to the scores for selection only; rises while an expert is under-loaded)`,
          'bias',
          Array.from({ length: experts }, (_, e) => ({ name: `expert ${e}`, points: points((s) => s.layers[l]?.bias?.[e]) })),
        ),
      );
    }
  }
  charts.push(lineChart('lr', 'Learning rate', 'lr', [{ name: 'lr', points: points((s) => s.lr) }]));
  charts.push(
    lineChart(
      'gradnorm',
      `Gradient norm (before clipping)${noisy}`,
      'norm',
      [{ name: 'gradient norm', points: points((s) => s.gradNorm), smooth: true }],
      true,
    ),
  );
  // The first step includes warm-up (allocations, first kernel launches): left out of throughput.
  charts.push(
    lineChart('tps', `Throughput${noisy}`, 'tokens/s', [
      { name: 'tokens/s', points: points((s) => (s === steps[0] && steps.length > 1 ? undefined : s.tokensPerSecond)), smooth: true },
    ]),
  );
  for (const c of charts) (c.option as { color?: string[] }).color = PALETTE;
  return charts;
}

export function renderReport(input: ReportInput): string {
  const echarts = readFileSync(createRequire(import.meta.url).resolve('echarts/dist/echarts.min.js'), 'utf8');
  const charts = reportCharts(input.steps);
  const rows = Object.entries(input.summary)
    .map(([k, v]) => `<tr><th>${escapeHtml(k)}</th><td>${escapeHtml(String(v))}</td></tr>`)
    .join('');
  const divs = charts
    .map((c) => `<h2>${escapeHtml(c.title)}</h2><div class="chart" id="${c.id}" style="height:${c.height}px"></div>`)
    .join('\n');
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${escapeHtml(input.title)}</title>
<style>body{font:14px system-ui,sans-serif;margin:24px;max-width:1100px}table{border-collapse:collapse}th,td{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd}
h2{font-size:16px;margin:20px 0 4px}.chart{margin-bottom:16px}pre{background:#f6f6f6;padding:8px;overflow:auto}</style>
<script>${echarts}</script></head><body>
<h1>${escapeHtml(input.title)}</h1>
<table>${rows}</table>
${divs}
<h2>Configuration</h2><pre>${escapeHtml(JSON.stringify(input.config, null, 2))}</pre>
<script>
const charts = ${JSON.stringify(charts).replace(/</g, '\\u003c')};
for (const c of charts) {
  if (c.id.startsWith('load')) c.option.tooltip.formatter = (p) => 'step ' + p.name + ', expert ' + p.value[1] + ': ' + p.value[3] + ' tokens, ' + p.value[4] + ' × the mean';
  if (c.id.startsWith('ept')) c.option.tooltip.formatter = (p) => 'step ' + p.name + ', ' + p.value[1] + ' experts: ' + p.value[3] + ' tokens (' + (100 * p.value[2]).toFixed(1) + '%)';
  echarts.init(document.getElementById(c.id)).setOption(c.option);
}
</script></body></html>
`;
}

/** Written beside `path` and renamed over it: a link at the path is replaced, never written through. */
export function writeReport(path: string, input: ReportInput): void {
  writeFileAtomic(path, renderReport(input), { fsync: false });
}
