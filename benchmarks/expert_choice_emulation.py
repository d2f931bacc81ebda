#!/usr/bin/env python3
"""Block-level emulation (numpy) of the expert-choice selection in native/ops/moe/router/expert_choice.cu,
written without a GPU: the same keys (f32 bits + 1, NaN -> 0), tiles of W columns and the same row
chunking, ec_hist's packed 16-bit counters (asserted never to overflow), ec_select's per-lane
suffix sums and early settling, ec_count/ec_scan/ec_final's streams of kRowsPerStream rows and the
slot formula above-before + min(need, equal-before), and the per-(tile, token) counts. Checked
against the rule of router.h (expert_choice_cpu.cc: per expert, stable order by score desc, NaN
last; the first C) on the same f32 scores, including exact ties (repeated rows, constant columns,
zeros) and NaN rows. A check of the algorithm, not of the CUDA code itself (test/gpu does that).

  python3 benchmarks/expert_choice_emulation.py [SEED] [CASES]
"""
import sys

import numpy as np

kEcWarps, kDigitBits, kBuckets, kKeyBits, kRowsPerStream, kMaxTile = 8, 10, 1024, 30, 16, 16
kPasses = kKeyBits // kDigitBits


def keys_of(s):
    bits = s.view(np.uint32).astype(np.int64)
    k = np.where(s == 0, 1, bits + 1)
    return np.where(np.isnan(s), 0, k).astype(np.int64)


def reference(s, C):
    T, E = s.shape
    slot = np.full((T, E), -1, np.int64)
    for e in range(E):
        col = s[:, e]
        key = np.where(np.isnan(col), -np.inf, col.astype(np.float64))
        order = sorted(range(T), key=lambda t: (-key[t], t))
        chosen = sorted(order[:C])
        for n, t in enumerate(chosen):
            slot[t, e] = n
    return slot


def emulate(s, C, sms=132):
    T, E = s.shape
    key = keys_of(s)
    W = 1
    while W < E and W < kMaxTile:
        W *= 2
    tiles = (E + W - 1) // W
    RPW = 32 // W
    S = kEcWarps * RPW
    chunk = S * kRowsPerStream
    chunks = max(1, -(-T // chunk))
    step = kEcWarps * RPW
    want = max(1, -(-4 * sms // tiles))
    hrows = -(-max(1, -(-T // want)) // step) * step
    hrows = min(hrows, 65535 // step * step)
    # ec_init
    prefix = np.zeros(E, np.int64)
    level = np.zeros(E, np.int64)
    need = np.full(E, C, np.int64)
    done = np.full(E, 1 if C in (0, T) else 0, np.int64)
    ghist = np.zeros((E, kBuckets), np.int64)
    for p in range(kPasses):
        # ec_hist: per (tile, chunk of hrows rows); a tile of settled columns is skipped
        for tile in range(tiles):
            cols = [e for e in range(tile * W, min(E, tile * W + W))]
            if all(done[e] for e in cols):
                continue
            for t0 in range(0, T, hrows):
                for e in cols:
                    if done[e]:
                        continue
                    k = key[t0:t0 + hrows, e]
                    hi_shift = kKeyBits - kDigitBits * p
                    m = (k >> hi_shift) == prefix[e]
                    d = (k[m] >> (hi_shift - kDigitBits)) & (kBuckets - 1)
                    counts = np.bincount(d, minlength=kBuckets)
                    assert counts.max(initial=0) < 65536, "a packed 16-bit counter would overflow"
                    ghist[e] += counts
        # ec_select: lane l holds digits 32l..32l+31
        for e in range(E):
            if done[e]:
                continue
            c = ghist[e].reshape(32, 32).copy()
            ghist[e] = 0
            lane_sum = c.sum(axis=1)
            incl = np.cumsum(lane_sum[::-1])[::-1]
            above = incl - lane_sum
            mine = [l for l in range(32) if above[l] < need[e] <= incl[l]]
            assert len(mine) == 1, (e, need[e], incl[0])
            l = mine[0]
            a = above[l]
            for i in range(31, -1, -1):
                if a + c[l, i] >= need[e]:
                    digit, rest, count = l * 32 + i, need[e] - a, c[l, i]
                    break
                a += c[l, i]
            lv = kDigitBits * (p + 1)
            prefix[e] = (prefix[e] << kDigitBits) | digit
            level[e] = lv
            need[e] = rest
            done[e] = 1 if (rest == count or lv == kKeyBits) else 0
    # ec_count + ec_scan: per (chunk, column) keys above / equal to the threshold prefix, summed before
    hi = key >> (kKeyBits - level)[None, :]
    above = (hi > prefix[None, :]).astype(np.int64)
    tie = (hi == prefix[None, :]).astype(np.int64)
    pad = chunks * chunk - T
    ab = np.concatenate([above, np.zeros((pad, E), np.int64)]).reshape(chunks, chunk, E)
    ti = np.concatenate([tie, np.zeros((pad, E), np.int64)]).reshape(chunks, chunk, E)
    before_gt = np.cumsum(ab.sum(1), 0) - ab.sum(1)
    before_eq = np.cumsum(ti.sum(1), 0) - ti.sum(1)
    # ec_final: streams of kRowsPerStream rows; per stream exclusive sums, then rows in order
    slot = np.full((T, E), -9, np.int64)
    part = np.zeros((tiles, T), np.int64)
    for c in range(chunks):
        sg = ab[c].reshape(S, kRowsPerStream, E).sum(1)
        se = ti[c].reshape(S, kRowsPerStream, E).sum(1)
        g0 = before_gt[c] + np.cumsum(sg, 0) - sg
        q0 = before_eq[c] + np.cumsum(se, 0) - se
        for st in range(S):
            g, q = g0[st].copy(), q0[st].copy()
            for i in range(kRowsPerStream):
                t = c * chunk + st * kRowsPerStream + i
                if t >= T:
                    continue
                a, tq = above[t], tie[t]
                chosen = (a == 1) | ((tq == 1) & (q < need))
                slot[t] = np.where(chosen, g + np.minimum(need, q), -1)
                g += a
                q += tq
                for tile in range(tiles):
                    part[tile, t] = chosen[tile * W:tile * W + W].sum()
    assert (slot != -9).all()
    assert (part.sum(0) == (slot >= 0).sum(1)).all()
    return slot


def scores_from(logits, sigmoid):
    if sigmoid:
        return (1 / (1 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    x = logits.astype(np.float64)
    e = np.exp(x - x.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def main():
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    cases = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    rng = np.random.default_rng(seed)
    shapes = [(1, 1), (7, 3), (300, 8), (257, 16), (999, 5), (2100, 64), (513, 40), (4097, 2), (700, 17)]
    for n in range(cases):
        T, E = shapes[n % len(shapes)]
        kind = n % 5
        logits = rng.normal(0, 1.5, (T, E)).astype(np.float32)
        if kind == 1:  # repeated rows: exact ties in every column
            logits = logits[rng.integers(0, max(1, T // 7), T)]
        elif kind == 2:  # a few constant columns and underflowing scores
            logits[:, : max(1, E // 3)] = -200
        elif kind == 3 and T > 2:  # NaN / inf rows
            logits[rng.integers(0, T, max(1, T // 10))] = np.nan
            logits[0, 0] = np.inf
        elif kind == 4:  # coarse grid: many near and exact ties
            logits = np.round(logits * 4) / 4
        bad = ~np.isfinite(logits).all(1)
        s = scores_from(np.where(np.isfinite(logits), logits, 0), bool(rng.integers(0, 2)))
        s[bad] = np.nan
        cf = [0.3, 1, 2, 2.7, E + 1][int(rng.integers(0, 5))]
        C = min(T, int(np.ceil(T * cf / E - 1e-9 * max(1, T * cf / E))))
        got = emulate(s, C)
        ref = reference(s, C)
        assert (got == ref).all(), f"case {n}: T={T} E={E} C={C} kind {kind}: {np.argwhere(got != ref)[:5]}"
        print(f"case {n}: T={T} E={E} C={C} kind {kind}: ok")
    print(f"all {cases} cases equal the reference rule (seed {seed})")


if __name__ == "__main__":
    main()
