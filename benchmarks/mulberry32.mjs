// mulberry32: a small seeded generator of uniform numbers in [0, 1), so that a benchmark's random
// routing or group counts are the same on every run and every rank. No imports: the shapes file
// (which profiling scripts load without the addon) uses it as well as harness.mjs.
export function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
