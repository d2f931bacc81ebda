"""PyTorch peer for benchmarks/serve.bench.mjs: one MoE layer's decode forward in PyTorch, eager and
captured in a CUDA graph, on the same weights and inputs as ours, timed with CUDA events in the same
run, and compared once with our outputs.

usage: serve_torch.py <inputs folder> <config JSON> [cuda | cpu]

config: {"H", "F", "E", "k", "score": "sigmoid" | "softmax", "groups", "topk_groups",
         "normalize", "route_scale", "bias": bool, "Ts": [token counts]}

Kept alive by the benchmark and driven through stdin/stdout (one JSON line per request, one JSON
line per answer), so that ours and this peer alternate in rounds on weights loaded once. After
loading the inputs, capturing a graph per T and running the check it prints one JSON line
("ready": true, the check per T); then:
  {"cmd": "round", "warmup": W, "repeats": R}: per T the median ms of the eager forward and of the
      graph step (copy x in, replay, copy y out), CUDA events, the GPU idle before each region;
  {"cmd": "host", "repeats": R}: per T the host (wall) ms of one eager call and of one graph step
      without a synchronisation after it, the GPU idle before each;
  {"cmd": "quit"} (or the end of stdin, or the benchmark's death): exits.

Inputs (harness.mjs writeInputs): x [Tmax,H] bf16 (T tokens = its first T rows); router [H,E]
bf16; bias [E] f32 (DeepSeek-V3's selection bias, when config.bias); w13 [E,H,2F] bf16 in our
interleaved layout (column 2i = gate row i, 2i+1 = up row i), turned while loading into [gate | up]
[E,H,2F] (one GEMM for both, then chunk); w2 [E,F,H] bf16; per T: y_T [T,H] bf16 (our eager
forward), idx_T [T,k] i32 (our routing). The big tensors are streamed to the device in chunks
through one pinned host buffer (no host copy of a whole tensor).

The layer (as moe-ep's MoEInference, one rank, dropless, no shared expert), no host synchronisation
anywhere, so the whole step can be captured:
  logits = x·Wr in fp32 (Wr kept as an fp32 copy); scores = sigmoid(logits) or softmax(logits);
  selection on scores + bias; with groups: a group scores the sum of its top k/topk_groups, the top
  topk_groups groups are kept and the others' experts masked to -inf; (idx) = top-k; w = scores at
  idx, / (sum + 1e-20) when normalize, × route_scale;
  assignments sorted by expert (stable sort), offsets = searchsorted (no bincount: it reads the
  maximum on the host), rows gathered; g = rows·[W1 | W3] (torch._grouped_mm, offs int32),
  h = silu(g1)·g3, out = h·W2 (torch._grouped_mm); y[t] = Σ_j w[t,j]·out[row(t,j)] in fp32, then
  bf16. torch._grouped_mm's 2d×3d forward takes groups of any size (0 included): no padding.
A torch without torch._grouped_mm (older than 2.8) gets a loop of matmuls per group in its place,
on the CPU only (dry runs of the script); CUDA graphs are skipped on the CPU.
"""
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import emit, grouped_mm_for, load_streamed as load, rel_err, serve_commands, watch_parent




def check_grouped_mm_args(a, b, offs):
    """What torch._grouped_mm's 2d × 3d call wants on CUDA (PyTorch's GroupedMMUtils.h): bf16,
    16-byte aligned data and strides, int32 cumulative offsets, one per group, rising, within the rows."""
    assert a.dtype == b.dtype == torch.bfloat16, (a.dtype, b.dtype)
    assert a.dim() == 2 and b.dim() == 3 and a.shape[1] == b.shape[1], (a.shape, b.shape)
    for nm, m in (("a", a), ("b", b)):
        assert m.data_ptr() % 16 == 0, f"{nm}: data_ptr not 16-byte aligned"
        assert m.stride()[-1] == 1 and (m.stride()[-2] * m.element_size()) % 16 == 0, f"{nm}: strides {m.stride()}"
    assert offs.dtype == torch.int32 and offs.dim() == 1 and offs.shape[0] == b.shape[0], (offs.dtype, offs.shape)
    o = offs.cpu().long()
    sizes = torch.diff(o, prepend=o.new_zeros(1))
    assert bool((sizes >= 0).all()) and int(o[-1]) <= a.shape[0], "offsets must rise and stay within the rows"


class MoE:
    """The MoE block of the module doc: __call__(x [T,H] bf16) → (y [T,H] bf16, idx [T,k])."""

    def __init__(self, cfg, wr, bias, w13, w2, grouped_mm):
        self.E, self.k = cfg["E"], cfg["k"]
        self.sigmoid = cfg["score"] == "sigmoid"
        self.groups, self.topk_groups = cfg.get("groups", 1), cfg.get("topk_groups", 1)
        self.normalize, self.route_scale = cfg["normalize"], float(cfg.get("route_scale", 1.0))
        self.wr32 = wr.float()  # [H,E]: the router GEMM in fp32, as HF's DeepSeek-V3 gate does
        self.bias = bias
        self.w13, self.w2 = w13, w2
        self.grouped_mm = grouped_mm
        self.expert_ids = torch.arange(self.E, device=wr.device)
        self.checking = False

    def route(self, x):
        T = x.shape[0]
        logits = x.float() @ self.wr32
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)
        sel = scores + self.bias if self.bias is not None else scores
        if self.groups > 1:
            per = self.E // self.groups
            gscore = sel.view(T, self.groups, per).topk(self.k // self.topk_groups, dim=-1).values.sum(dim=-1)
            keep = gscore.topk(self.topk_groups, dim=-1).indices
            gmask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, keep, True)
            sel = sel.masked_fill(~gmask.unsqueeze(-1).expand(T, self.groups, per).reshape(T, self.E), float("-inf"))
        idx = sel.topk(self.k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.normalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.route_scale, idx

    def __call__(self, x):
        T, H = x.shape
        k = self.k
        w, idx = self.route(x)
        flat = idx.reshape(-1)
        sorted_e, order = flat.sort(stable=True)
        offs = torch.searchsorted(sorted_e, self.expert_ids, right=True).to(torch.int32)
        rows = x.index_select(0, order // k)
        if self.checking:
            check_grouped_mm_args(rows, self.w13, offs)
        g1, g3 = self.grouped_mm(rows, self.w13, offs=offs).chunk(2, dim=-1)
        h = F.silu(g1) * g3
        if self.checking:
            check_grouped_mm_args(h, self.w2, offs)
        out = self.grouped_mm(h, self.w2, offs=offs)
        pos = torch.empty_like(order).scatter_(0, order, torch.arange(T * k, device=x.device))
        y = (out.index_select(0, pos).view(T, k, H).float() * w.unsqueeze(-1)).sum(dim=1)
        return y.to(x.dtype), idx


def main():
    watch_parent()
    folder, cfg = sys.argv[1], json.loads(sys.argv[2])
    device = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cuda")
    on_gpu = device.type == "cuda"
    grouped_mm, grouped_mm_is = grouped_mm_for(device)
    H, Fw, E = cfg["H"], cfg["F"], cfg["E"]
    Ts = [int(T) for T in cfg["Ts"]]

    t0 = time.perf_counter()
    manifest = json.load(open(os.path.join(folder, "inputs.json")))

    def gate_up(chunk):  # ours' interleaved [n,H,2F] (2i gate, 2i+1 up) → [n,H,2F] = [gate | up]
        n = chunk.shape[0]
        return chunk.view(n, H, Fw, 2).permute(0, 1, 3, 2).reshape(n, H, 2 * Fw)

    w13 = load(folder, manifest, "w13", device, transform=gate_up)
    w2 = load(folder, manifest, "w2", device)
    wr = load(folder, manifest, "router", device)
    bias = load(folder, manifest, "bias", device) if cfg.get("bias") else None
    x_all = load(folder, manifest, "x", device)
    ours_y = {T: load(folder, manifest, f"y_{T}", device) for T in Ts}
    ours_idx = {T: load(folder, manifest, f"idx_{T}", device) for T in Ts}
    if on_gpu:
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0
    layer = MoE(cfg, wr, bias, w13, w2, grouped_mm)
    xs = {T: x_all[:T].clone() for T in Ts}

    # ------------------------------------------------------------------ graphs (CUDA only)
    graphs, graph_errors = {}, {}

    def capture(T):
        static_x = xs[T].clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream (cuBLAS/CUTLASS workspaces, allocator), as PyTorch advises
                layer(static_x)
        torch.cuda.current_stream(device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y, _ = layer(static_x)
        return {"g": g, "x": static_x, "y": static_y, "out": torch.empty_like(static_y)}

    def graph_step(G, x):
        G["x"].copy_(x)
        G["g"].replay()
        return G["out"].copy_(G["y"])

    t1 = time.perf_counter()
    if on_gpu:
        for T in Ts:
            try:
                graphs[T] = capture(T)
            except Exception as e:  # reported; that T's graph row stays empty
                graph_errors[T] = f"{type(e).__name__}: {e}"
        torch.cuda.synchronize(device)
    capture_s = time.perf_counter() - t1

    # ------------------------------------------------------------------ the check
    check = {}
    with torch.no_grad():
        for T in Ts:
            layer.checking = T == Ts[-1]  # assert _grouped_mm's requirements once (host reads: outside any capture)
            y, idx = layer(xs[T])
            layer.checking = False
            ref_idx = ours_idx[T].long()
            same = (idx.sort(dim=-1).values == ref_idx.sort(dim=-1).values).all(dim=-1)
            row = {
                "T": T,
                "rel_err": rel_err(ours_y[T], y),  # ‖ours − torch‖ / ‖torch‖
                "rel_err_same_routing": rel_err(ours_y[T][same], y[same]) if bool(same.any()) else None,
                "routing_mismatch_tokens": int((~same).sum()),
                "experts_touched": int(torch.unique(idx).numel()),
            }
            if T in graphs:
                yg = graph_step(graphs[T], xs[T]).clone()
                row["graph_vs_eager_max_abs"] = float((yg.float() - y.float()).abs().max())
                row["graph_equals_eager"] = bool(torch.equal(yg, y))
            check[T] = row
    del ours_y, ours_idx
    emit(
        {
            "ready": True,
            "torch": torch.__version__,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if on_gpu else None,
            "grouped_mm": grouped_mm_is,
            "graphs": "captured per T" if on_gpu else "skipped: CUDA graphs need CUDA (CPU dry run)",
            "graph_errors": {str(T): v for T, v in graph_errors.items()},
            "load_s": load_s,
            "capture_s": capture_s,
            "check": [check[T] for T in Ts],
        }
    )

    # ------------------------------------------------------------------ timing
    def sync():
        if on_gpu:
            torch.cuda.synchronize(device)

    def timed(body, warmup, repeats):
        times = []
        for i in range(warmup + repeats):
            sync()
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                body()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t = time.perf_counter()
                body()
                ms = (time.perf_counter() - t) * 1e3
            if i >= warmup:
                times.append(ms)
        times.sort()
        return times[len(times) // 2]

    def host_timed(body, warmup, repeats):
        """Wall ms of body() alone (no synchronisation after it), the GPU idle before each call."""
        times = []
        for i in range(warmup + repeats):
            sync()
            t = time.perf_counter()
            body()
            ms = (time.perf_counter() - t) * 1e3
            if i >= warmup:
                times.append(ms)
        sync()
        times.sort()
        return times[len(times) // 2]

    def per_T(fn, cmd):
        warmup, repeats = int(cmd.get("warmup", 3)), int(cmd.get("repeats", 10))
        out = []
        with torch.no_grad():
            for T in Ts:
                x = xs[T]
                G = graphs.get(T)
                out.append(
                    {
                        "T": T,
                        "eager_ms": fn(lambda: layer(x), warmup, repeats),
                        "graph_ms": fn(lambda: graph_step(G, x), warmup, repeats) if G else None,
                    }
                )
        return {"warmup": warmup, "repeats": repeats, "rows": out}

    serve_commands({"round": lambda cmd: per_T(timed, cmd), "host": lambda cmd: per_T(host_timed, cmd)})

if __name__ == "__main__":
    main()
