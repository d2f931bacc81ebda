// The grouped-GEMM shapes of issues #3 and #7 (M rows split into groups by counts, K inner, N
// columns), shared by the benchmark and the profiling script.
function balanced(E, M) {
  return Array.from({ length: E }, (_, e) => Math.floor(((e + 1) * M) / E) - Math.floor((e * M) / E));
}
// Zipf(1.0) over experts, rounded to multiples of 8 rows (torch's dW needs that), summing to M.
function zipf(E, M) {
  const w = Array.from({ length: E }, (_, e) => 1 / (e + 1));
  const s = w.reduce((x, y) => x + y, 0);
  const counts = w.map((x) => Math.floor(((x / s) * M) / 8) * 8);
  counts[0] += M - counts.reduce((x, y) => x + y, 0);
  return counts;
}

export const shapes = [
  { name: 'T=32768 H=7168 F=2048 E=64 balanced', M: 32768, K: 7168, N: 2048, counts: balanced(64, 32768) },
  { name: 'T=32768 H=7168 F=2048 E=64 zipf', M: 32768, K: 7168, N: 2048, counts: zipf(64, 32768) },
  { name: 'T=8192 H=4096 F=14336 E=8', M: 8192, K: 4096, N: 14336, counts: balanced(8, 8192) },
  { name: 'T=4096x8 H=7168 F=2048 E=256', M: 32768, K: 7168, N: 2048, counts: balanced(256, 32768) },
  { name: 'T=65536x8 H=2048 F=768 E=128 fine-grained', M: 524288, K: 2048, N: 768, counts: balanced(128, 524288) },
  { name: 'T=128x8 H=7168 F=2048 E=256 decode', M: 1024, K: 7168, N: 2048, counts: balanced(256, 1024) },
];
