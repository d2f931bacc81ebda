"""PyTorch peer for benchmarks/router-gemm.bench.mjs: the router's fp32 logits x[T,H]·Wr[H,E] as a
PyTorch user writes them, on the same inputs, timed with CUDA events in the same run.

usage: router_gemm_torch.py <inputs folder> <number of shapes> [cuda | cpu]

Inputs (harness.mjs writeInputs): x<i> [T,H] bf16 and wr<i> [H,E] bf16 for each shape i.
Kept alive by the benchmark and driven through stdin/stdout: after loading it prints one JSON line
({"ready": true, "torch", "mm_out_dtype"}); then it answers each JSON line on stdin with one:
  {"cmd": "check", "dir": D}: our logits (D/logits<i>.bin, f32 [T,E]) against x.float() @ Wr.float()
      computed here, relative error in norm per shape ({"rel_err": {i: e}});
  {"cmd": "round", "case": i, "warmup": W, "repeats": R, "inner": n, "sets": s}: one round of both
      variants on shape i ({"linear_ms", "mm_f32_ms"}: ms per call, null where unsupported);
  {"cmd": "quit"} (or the end of stdin): exits.
Variants:
  linear   F.linear(x, Wr.t()).float(): bf16 logits (cuBLAS, fp32 accumulate, rounded to bf16), then
           cast to fp32: what MoE code in PyTorch usually does (a Linear(H, E, bias=False) router)
  mm_f32   torch.mm(x, Wr, out_dtype=torch.float32): fp32 logits from the bf16 product directly, on
           a torch whose mm takes out_dtype (probed once at start; null otherwise)
Timing: like harness.mjs timeRegion: `inner` back-to-back calls per region rotating among `sets`
copies of x and Wr (so a call does not find its inputs in L2), median over `repeats` regions after
`warmup`, per call.
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import emit, load_inputs, rel_err, serve_commands, watch_parent


def main():
    folder, n_shapes = sys.argv[1], int(sys.argv[2])
    device = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cuda")
    watch_parent()
    inputs = load_inputs(folder, device)
    shapes = [(inputs[f"x{i}"], inputs[f"wr{i}"]) for i in range(n_shapes)]

    # Does this torch's mm take out_dtype (bf16 in, fp32 out)?
    mm_out_dtype = None
    try:
        x0, w0 = shapes[0]
        torch.mm(x0, w0, out_dtype=torch.float32)
        mm_out_dtype = "torch.mm(x, Wr, out_dtype=torch.float32)"
    except (TypeError, RuntimeError, NotImplementedError) as e:
        print(f"router_gemm_torch: torch.mm out_dtype unsupported here: {type(e).__name__}: {e}", file=sys.stderr)

    variants = {"linear": lambda x, w: F.linear(x, w.t()).float()}
    if mm_out_dtype:
        variants["mm_f32"] = lambda x, w: torch.mm(x, w, out_dtype=torch.float32)

    copies = {}

    def sets_of(i, n):
        if copies.get(i, (None, 0))[1] != n:
            x, w = shapes[i]
            copies[i] = ([(x.clone(), w.clone()) for _ in range(n)], n)
        return copies[i][0]

    def region(fn, sets, inner, warmup, repeats):
        on_gpu = device.type == "cuda"
        times, k = [], 0
        for r in range(warmup + repeats):
            if on_gpu:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                t0 = time.perf_counter()
            for _ in range(inner):
                x, w = sets[k % len(sets)]
                fn(x, w)
                k += 1
            if on_gpu:
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                ms = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                times.append(ms / inner)
        times.sort()
        return times[len(times) // 2]

    def check(cmd):
        out = {}
        for i, (x, w) in enumerate(shapes):
            raw = np.fromfile(os.path.join(cmd["dir"], f"logits{i}.bin"), dtype=np.float32).reshape(x.shape[0], w.shape[1])
            ref = x.float() @ w.float()
            out[str(i)] = rel_err(torch.from_numpy(raw).to(device), ref)
            for name, fn in variants.items():
                out[f"{i} {name} vs fp32"] = rel_err(fn(x, w), ref)
        return {"rel_err": {k: v for k, v in out.items() if " " not in k}, "torch_rel_err": {k: v for k, v in out.items() if " " in k}}

    def round_(cmd):
        sets = sets_of(cmd["case"], cmd["sets"])
        res = {}
        for name in ("linear", "mm_f32"):
            fn = variants.get(name)
            res[f"{name}_ms"] = region(fn, sets, cmd["inner"], cmd["warmup"], cmd["repeats"]) if fn else None
        return res

    emit({"ready": True, "torch": torch.__version__, "mm_out_dtype": mm_out_dtype, "device": str(device)})
    serve_commands({"check": check, "round": round_})


if __name__ == "__main__":
    main()
