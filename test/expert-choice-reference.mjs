// A plain-loop float64 reference of one MoE layer with expert-choice routing, forward and backward,
// on one rank's tokens; independent of the addon (plain arrays in, plain arrays out). Shared by
// test/14-moe-layer-expert-choice.test.ts (EP = 1) and test/mpi/moe-layer.mjs (EP = 2, 4).
//
// Layout of the arguments (row-major, as the layer's master tensors hold them):
//   x, dy [T·H]; router [H·E]; w13 [E·H·2F] with W1 in the even columns and W3 in the odd ones
//   (w13[e][h][2i] = W1[h,i], w13[e][h][2i+1] = W3[h,i]); w2 [E·F·H]; shared: { w13 [H·2Fs], w2 [Fs·H] }
//   cfg: { H, F, E, Fs (0: no shared expert), C, score: 'softmax' | 'sigmoid', routeScale, zLossCoef }
// Routing: logits = x·router, scores S = softmax over E (or sigmoid), expert e takes the C tokens
// with the largest S[t,e] (ties: the lower t), gate g[t,e] = routeScale·S[t,e]; y[t] = Σ_e chosen
// g·FFN_e(x[t]) + FFN_shared(x[t]), FFN(v) = (silu(v·W1) ⊙ v·W3)·W2.
// minGap: over experts, the relative gap between the C-th and (C+1)-th score; callers require it
// to be well above float error, so that the layer's f32 routing cannot legitimately differ.

const silu = (v) => v / (1 + Math.exp(-v));
const sigmoid = (v) => 1 / (1 + Math.exp(-v));

export function expertChoiceReference({ x, dy, router, w13, w2, shared, cfg }) {
  const { H, F, E, Fs = 0, C, score = 'softmax', routeScale = 1, zLossCoef = 0 } = cfg;
  const T = x.length / H;
  const logits = new Float64Array(T * E);
  for (let t = 0; t < T; t++)
    for (let e = 0; e < E; e++) {
      let a = 0;
      for (let h = 0; h < H; h++) a += x[t * H + h] * router[h * E + e];
      logits[t * E + e] = a;
    }
  const S = new Float64Array(T * E);
  for (let t = 0; t < T; t++) {
    const row = logits.subarray(t * E, (t + 1) * E);
    if (score === 'sigmoid') row.forEach((v, e) => (S[t * E + e] = sigmoid(v)));
    else {
      const m = Math.max(...row);
      let z = 0;
      row.forEach((v) => (z += Math.exp(v - m)));
      row.forEach((v, e) => (S[t * E + e] = Math.exp(v - m) / z));
    }
  }
  // selection
  const chosen = new Uint8Array(T * E);
  const slot = new Int32Array(T * E).fill(-1);
  let minGap = Infinity;
  for (let e = 0; e < E; e++) {
    const order = Array.from({ length: T }, (_, t) => t).sort((a, b) => S[b * E + e] - S[a * E + e] || a - b);
    for (let r = 0; r < C; r++) chosen[order[r] * E + e] = 1;
    if (C > 0 && C < T) {
      const a = S[order[C - 1] * E + e],
        b = S[order[C] * E + e];
      minGap = Math.min(minGap, (a - b) / a);
    }
    let n = 0;
    for (let t = 0; t < T; t++) if (chosen[t * E + e]) slot[t * E + e] = n++;
  }
  const y = new Float64Array(T * H);
  const dx = new Float64Array(T * H);
  const dW13 = new Float64Array(E * H * 2 * F);
  const dW2 = new Float64Array(E * F * H);
  const dShared13 = new Float64Array(H * 2 * Fs);
  const dShared2 = new Float64Array(Fs * H);
  const dlogits = new Float64Array(T * E);

  // One SwiGLU expert on token t, forward and (with dOut) backward. a13: [H·2f] interleaved, a2: [f·H].
  const ffn = (t, a13, a2, f, gate, g13, g2) => {
    const a1 = new Float64Array(f),
      a3 = new Float64Array(f),
      hAct = new Float64Array(f);
    for (let i = 0; i < f; i++) {
      let u = 0,
        v = 0;
      for (let h = 0; h < H; h++) {
        u += x[t * H + h] * a13[h * 2 * f + 2 * i];
        v += x[t * H + h] * a13[h * 2 * f + 2 * i + 1];
      }
      a1[i] = u;
      a3[i] = v;
      hAct[i] = silu(u) * v;
    }
    const out = new Float64Array(H);
    for (let o = 0; o < H; o++) {
      let s = 0;
      for (let i = 0; i < f; i++) s += hAct[i] * a2[i * H + o];
      out[o] = s;
    }
    // backward with dOut = gate·dy[t]
    const dOut = new Float64Array(H);
    for (let o = 0; o < H; o++) dOut[o] = gate * dy[t * H + o];
    for (let i = 0; i < f; i++) {
      let dh = 0;
      for (let o = 0; o < H; o++) {
        g2[i * H + o] += hAct[i] * dOut[o];
        dh += a2[i * H + o] * dOut[o];
      }
      const sg = sigmoid(a1[i]);
      const da1 = dh * a3[i] * sg * (1 + a1[i] * (1 - sg));
      const da3 = dh * silu(a1[i]);
      for (let h = 0; h < H; h++) {
        g13[h * 2 * f + 2 * i] += x[t * H + h] * da1;
        g13[h * 2 * f + 2 * i + 1] += x[t * H + h] * da3;
        dx[t * H + h] += a13[h * 2 * f + 2 * i] * da1 + a13[h * 2 * f + 2 * i + 1] * da3;
      }
    }
    return out;
  };

  for (let t = 0; t < T; t++) {
    const dS = new Float64Array(E);
    for (let e = 0; e < E; e++) {
      if (!chosen[t * E + e]) continue;
      const gate = routeScale * S[t * E + e];
      const a13 = w13.subarray ? w13.subarray(e * H * 2 * F, (e + 1) * H * 2 * F) : w13.slice(e * H * 2 * F, (e + 1) * H * 2 * F);
      const a2 = w2.subarray ? w2.subarray(e * F * H, (e + 1) * F * H) : w2.slice(e * F * H, (e + 1) * F * H);
      const out = ffn(t, a13, a2, F, gate, dW13.subarray(e * H * 2 * F, (e + 1) * H * 2 * F), dW2.subarray(e * F * H, (e + 1) * F * H));
      let dg = 0;
      for (let h = 0; h < H; h++) {
        y[t * H + h] += gate * out[h];
        dg += dy[t * H + h] * out[h];
      }
      dS[e] = routeScale * dg;
    }
    if (Fs) {
      const out = ffn(t, shared.w13, shared.w2, Fs, 1, dShared13, dShared2);
      for (let h = 0; h < H; h++) y[t * H + h] += out[h];
    }
    let c = 0;
    for (let e = 0; e < E; e++) c += S[t * E + e] * dS[e];
    for (let e = 0; e < E; e++) {
      const s = S[t * E + e];
      dlogits[t * E + e] = score === 'sigmoid' ? dS[e] * s * (1 - s) : s * (dS[e] - c);
    }
    if (zLossCoef) {
      const row = logits.subarray(t * E, (t + 1) * E);
      const m = Math.max(...row);
      let z = 0;
      row.forEach((v) => (z += Math.exp(v - m)));
      const lse = m + Math.log(z);
      row.forEach((v, e) => (dlogits[t * E + e] += (zLossCoef * 2 * lse * Math.exp(v - lse)) / T));
    }
  }
  const dRouter = new Float64Array(H * E);
  for (let t = 0; t < T; t++)
    for (let e = 0; e < E; e++) {
      const d = dlogits[t * E + e];
      for (let h = 0; h < H; h++) {
        dRouter[h * E + e] += x[t * H + h] * d;
        dx[t * H + h] += d * router[h * E + e];
      }
    }
  const hist = new Array(E + 1).fill(0);
  for (let t = 0; t < T; t++) {
    let n = 0;
    for (let e = 0; e < E; e++) n += chosen[t * E + e];
    hist[n]++;
  }
  return { y, dx, dRouter, dW13, dW2, dShared13, dShared2, slot, expertsPerToken: hist, minGap };
}
