"""PyTorch peer for benchmarks/moe-layer.bench.mjs: the same MoE layer in autograd, on the same
weights and inputs, timed with CUDA events in the same run, and compared with our outputs and
gradients.

usage: moe_layer_torch.py <inputs folder> <top-k> [cuda | cpu]

Kept alive by the benchmark and driven through stdin/stdout, so that ours and this peer alternate
in rounds on inputs loaded once: after loading the inputs and running the check it prints one JSON
line (the check, "ready": true); then it answers each JSON line on stdin with one JSON line:
  {"cmd": "round", "warmup": W, "repeats": R, "streak": S, "streak_repeats": Q, "peak_n": N}: one
      round of timings: forward, backward, forward + backward, and S forward + backward steps back
      to back (median of Q regions after one, over S: streak_ms) of both variants (the fused one's
      keys prefixed fused_), AdamW, and a square bf16 N×N·N×N torch.matmul (matmul_tflops, the
      tensor-core roof the benchmark's breakdown uses);
  {"cmd": "quit"} (or the end of stdin): exits.

Inputs (harness.mjs writeInputs): x, dy [T,H] bf16; router [H,E] bf16; w1, w3 [E,H,F] bf16 (out of
our interleaved w13); w2 [E,F,H] bf16; ours: y, dx [T,H] bf16, dRouter [H,E] f32, dW1, dW3 [E,H,F]
f32, dW2 [E,F,H] f32, indices [T,k] i32.

The layer (as moe-ep's MoELayer with softmax routing, normalize = false, dropless):
  logits = x·Wr in fp32; probs = softmax(logits); (w, idx) = top-k(probs), w not renormalised;
  assignments sorted by expert (stable), each expert's group padded to a multiple of 16 rows with
  zero rows (torch._grouped_mm's backward wants aligned groups) within a static bound, the counts
  by an integer scatter (torch.bincount reads the maximum on the host), so no host sync;
  g1 = xs·W1, g3 = xs·W3 (torch._grouped_mm, offs = cumulative padded counts, int32);
  out = (silu(g1)·g3)·W2; y[t] = Σ_j w[t,j]·out[row(t,j)] in fp32, then bf16. Backward: autograd
  with dy. 'fused': the same with one GEMM against [W1 | W3] ([E,H,2F], a leaf made once).
Check (before timing): y, dx, dRouter, dW1, dW3, dW2 against ours, relative error in norm; y and dx
also over the tokens both routed alike ('y (same routing)', 'dx (same routing)': a token's y and dx
depend on its own routing only). The first pass also asserts what torch._grouped_mm wants on CUDA
(PyTorch's GroupedMMUtils.h; the CPU path skips some), so a dry run on the CPU checks it too.
A torch without torch._grouped_mm (older than 2.8) gets a loop of matmuls per group in its place,
on the CPU only (dry runs of the script): the answers then say so ("grouped_mm").
"""
import sys
import time

import torch
import torch.nn.functional as F

from common import emit, grouped_mm_for, load_inputs, rel_err, serve_commands

ALIGN = 16




def check_grouped_mm_args(a, b, offs, align=ALIGN):
    """What torch._grouped_mm requires of a 2d x 3d call on CUDA (bf16, 16-byte aligned data and
    strides, int32 cumulative offsets, one per group), plus what its backward's 2d x 2d product
    (dW) wants: every group a multiple of `align` rows."""
    assert a.dtype == b.dtype == torch.bfloat16, (a.dtype, b.dtype)
    assert a.dim() == 2 and b.dim() == 3 and a.shape[1] == b.shape[1], (a.shape, b.shape)
    for name, m in (("a", a), ("b", b)):
        assert m.data_ptr() % 16 == 0, f"{name}: data_ptr not 16-byte aligned"
        st, sz = m.stride(), m.shape
        if st[-1] == 1:
            assert st[-2] >= max(1, sz[-1]) and (st[-2] * m.element_size()) % 16 == 0, f"{name}: strides {st} for sizes {tuple(sz)}"
        else:
            assert st[-2] == 1 and st[-1] >= max(1, sz[-2]) and (st[-1] * m.element_size()) % 16 == 0, f"{name}: strides {st} for sizes {tuple(sz)}"
    assert offs.dtype == torch.int32 and offs.dim() == 1 and offs.shape[0] == b.shape[0], (offs.dtype, offs.shape)
    assert offs.device == a.device, (offs.device, a.device)
    o = offs.cpu().long()
    sizes = torch.diff(o, prepend=o.new_zeros(1))
    assert bool((sizes >= 0).all()) and int(o[-1]) <= a.shape[0], "offsets must rise and stay within the rows"
    assert bool((sizes % align == 0).all()), f"groups must be multiples of {align} rows"


def routed_layer(x, wr, k, experts, align=ALIGN):
    """y [T,H] of the MoE layer; experts(xs, offs) → out rows. Differentiable in x, wr and the experts."""
    T, H = x.shape
    E = wr.shape[1]
    logits = x.float() @ wr.float()
    probs = logits.softmax(dim=-1)
    topw, topi = probs.topk(k, dim=-1)
    flat = topi.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # Not torch.bincount: on CUDA it reads the maximum back to the host (a wait for every kernel
    # queued before it, so a step could never be queued ahead of the GPU). An exact integer scatter.
    counts = torch.zeros(E, dtype=torch.long, device=x.device).index_add_(0, flat, torch.ones_like(flat))
    padded = (counts + align - 1) // align * align
    ends = padded.cumsum(0)
    starts = ends - padded
    first = counts.cumsum(0) - counts
    sorted_e = flat[order]
    dest = starts[sorted_e] + (torch.arange(T * k, device=x.device) - first[sorted_e])
    bound = T * k + E * (align - 1)  # every padded layout fits: no host read of the counts
    src = torch.full((bound,), T, dtype=torch.long, device=x.device)  # T: the zero row
    src[dest] = order // k
    xs = torch.cat([x, x.new_zeros(1, H)])[src]
    out = experts(xs, ends.to(torch.int32))
    pos = torch.empty_like(flat)
    pos[order] = dest
    y = (out[pos].view(T, k, H).float() * topw.unsqueeze(-1)).sum(dim=1)
    return y.to(x.dtype), topi


def main():
    folder, k = sys.argv[1], int(sys.argv[2])
    device = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cuda")
    grouped_mm, grouped_mm_is = grouped_mm_for(device)
    inp = load_inputs(folder, device=device)
    dy = inp["dy"]

    def leaf(t):
        return t.detach().clone().requires_grad_(True)

    x, wr, w1, w3, w2 = (leaf(inp[n]) for n in ("x", "router", "w1", "w3", "w2"))
    w13 = leaf(torch.cat([inp["w1"], inp["w3"]], dim=-1))  # for the fused variant
    w2f = leaf(inp["w2"])

    checking = [True]  # the check pass asserts the CUDA requirements; timed passes do not

    def experts(xs, offs):
        if checking[0]:
            check_grouped_mm_args(xs, w1, offs)
            check_grouped_mm_args(xs, w3, offs)
        g1 = grouped_mm(xs, w1, offs=offs)
        g3 = grouped_mm(xs, w3, offs=offs)
        h = F.silu(g1) * g3
        if checking[0]:
            check_grouped_mm_args(h, w2, offs)
        return grouped_mm(h, w2, offs=offs)

    def experts_fused(xs, offs):
        if checking[0]:
            check_grouped_mm_args(xs, w13, offs)
        g1, g3 = grouped_mm(xs, w13, offs=offs).chunk(2, dim=-1)
        h = F.silu(g1) * g3
        if checking[0]:
            check_grouped_mm_args(h, w2f, offs)
        return grouped_mm(h, w2f, offs=offs)

    params = [x, wr, w1, w3, w2, w13, w2f]

    def zero_grads():
        for p in params:
            p.grad = None

    # ------------------------------------------------------------------------------- the check
    y, topi = routed_layer(x, wr, k, experts)
    y.backward(dy)
    ours_idx = inp["indices"].long()
    same = (topi.sort(dim=-1).values == ours_idx.sort(dim=-1).values).all(dim=-1)
    ready = {
        "ready": True,
        "torch": torch.__version__,
        "device": str(device),
        "grouped_mm": grouped_mm_is,
        "routing_mismatch_tokens": int((~same).sum()),
        "rel_err": {
            "y": rel_err(inp["y"], y.detach()),
            "y (same routing)": rel_err(inp["y"][same], y.detach()[same]),
            "dx": rel_err(inp["dx"], x.grad),
            "dx (same routing)": rel_err(inp["dx"][same], x.grad[same]),
            "dRouter": rel_err(inp["dRouter"], wr.grad),
            "dW1": rel_err(inp["dW1"], w1.grad),
            "dW3": rel_err(inp["dW3"], w3.grad),
            "dW2": rel_err(inp["dW2"], w2.grad),
        },
    }
    # The gradients AdamW applies in every round (the check's, kept: timing passes reset .grad).
    model = [wr, w1, w3, w2]
    adam_grads = [p.grad.detach().clone() for p in model]
    with torch.no_grad():
        yf, _ = routed_layer(x, wr, k, experts_fused)
    ready["fused_vs_unfused_y"] = rel_err(yf, y.detach())
    checking[0] = False
    del y, yf, topi, same
    inp.clear()  # free the loaded copies (x, dy and the weights live on as leaves and dy) before timing
    zero_grads()
    emit(ready)

    # ------------------------------------------------------------------------------- timing
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(body, warmup, repeats, setup=None):
        times = []
        for i in range(warmup + repeats):
            ctx = setup() if setup else None
            sync()
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                body(ctx)
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                body(ctx)
                ms = (time.perf_counter() - t0) * 1e3
            zero_grads()
            if i >= warmup:
                times.append(ms)
        times.sort()
        return times[len(times) // 2]

    # AdamW on fp32 masters of the bf16 params (router, w1, w3, w2), then copied into the params:
    # what a bf16 model with fp32 optimizer state does in PyTorch. Made at the first round.
    adam = {}

    def adamw(_):
        for m, g in zip(adam["masters"], adam_grads):
            m.grad.copy_(g)  # bf16 grads into the fp32 masters' grads
        adam["opt"].step()
        with torch.no_grad():
            for m, p in zip(adam["masters"], model):
                p.copy_(m)

    peak = {}

    def steps(ex, n):
        # n steps back to back (a training loop's steady state), each step's gradients dropped
        # as it is queued: what ours does with its streak
        for _ in range(n):
            routed_layer(x, wr, k, ex)[0].backward(dy)
            zero_grads()

    def round_(cmd):
        warmup, repeats = int(cmd.get("warmup", 3)), int(cmd.get("repeats", 10))
        streak, streak_repeats = int(cmd.get("streak", 8)), int(cmd.get("streak_repeats", 3))
        result = {"warmup": warmup, "repeats": repeats}
        dy_ = dy
        for tag, ex in (("", experts), ("fused_", experts_fused)):
            result[tag + "forward_ms"] = timed(lambda _: routed_layer(x, wr, k, ex), warmup, repeats)
            result[tag + "backward_ms"] = timed(lambda y: y.backward(dy_), warmup, repeats, setup=lambda: routed_layer(x, wr, k, ex)[0])
            result[tag + "step_ms"] = timed(lambda _: routed_layer(x, wr, k, ex)[0].backward(dy_), warmup, repeats)
            result[tag + "streak_ms"] = timed(lambda _: steps(ex, streak), 1, streak_repeats) / streak
        if not adam:
            adam["masters"] = [p.detach().float().clone() for p in model]
            for m in adam["masters"]:
                m.grad = torch.zeros_like(m)
            fused = {"fused": True} if device.type == "cuda" else {}  # (older torch: no 'fused' at all)
            adam["opt"] = torch.optim.AdamW(adam["masters"], lr=1e-6, weight_decay=0.1, **fused)
        result["adamw_ms"] = timed(adamw, warmup, repeats)
        # The tensor-core roof: one square bf16 product, N×N · N×N (2·N³ FLOPs).
        n = int(cmd.get("peak_n", 8192))
        if peak.get("n") != n:
            gen = torch.Generator(device=device).manual_seed(5)
            peak.update(n=n, a=torch.randn(n, n, device=device, generator=gen).bfloat16(), b=torch.randn(n, n, device=device, generator=gen).bfloat16())
            peak["c"] = torch.empty(n, n, device=device, dtype=torch.bfloat16)
        ms = timed(lambda _: torch.matmul(peak["a"], peak["b"], out=peak["c"]), warmup, max(5, repeats // 2))
        result["matmul_n"] = n
        result["matmul_ms"] = ms
        result["matmul_tflops"] = 2 * n**3 / (ms * 1e-3) / 1e12
        return result

    # ------------------------------------------------------------------------------- commands
    serve_commands({"round": round_})

if __name__ == "__main__":
    main()
