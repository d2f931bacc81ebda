"""PyTorch peer for benchmarks/activation.bench.mjs: the activations and the backward kernels torch's
autograd calls for them, on the GPU, timed with CUDA events in the same run as ours.

usage: activation_torch.py [cuda | cpu]

Kept alive by the benchmark and driven through stdin/stdout: after starting it prints one JSON line
({"ready": true, "torch"}); then it answers each JSON line on stdin with one:
  {"cmd": "check", "dir": D}: ours against torch on the same inputs (D, harness.mjs writeInputs:
      x_<dtype>, dy_<dtype>, and our <op>_<dtype> for each op): per op and dtype the relative error
      in norm and the share of elements whose bits differ ({"check": {"<op> <dtype>": {...}}});
  {"cmd": "round", "dtype": "bf16", "shape": [R, C], "warmup": W, "repeats": N}: one round of every
      op on torch's own random tensors of that shape and dtype, and a device copy of x
      ({"ms": {op: ms}}); the values do not change the time of these elementwise kernels;
  {"cmd": "quit"} (or the end of stdin): exits.
Ops: relu, silu, gelu, geluTanh (F.relu, F.silu, F.gelu(approximate='none'|'tanh')); reluBackward,
siluBackward, geluBackward, geluTanhBackward (aten threshold_backward(dy, x, 0), silu_backward,
gelu_backward: what autograd runs for them).
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

from common import emit, load_inputs, rel_err, serve_commands, watch_parent

TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
aten = torch.ops.aten
OPS = {
    "relu": lambda x, dy: F.relu(x),
    "silu": lambda x, dy: F.silu(x),
    "gelu": lambda x, dy: F.gelu(x),
    "geluTanh": lambda x, dy: F.gelu(x, approximate="tanh"),
    "reluBackward": lambda x, dy: aten.threshold_backward(dy, x, 0),
    "siluBackward": lambda x, dy: aten.silu_backward(dy, x),
    "geluBackward": lambda x, dy: aten.gelu_backward(dy, x, approximate="none"),
    "geluTanhBackward": lambda x, dy: aten.gelu_backward(dy, x, approximate="tanh"),
}


def main():
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    watch_parent()
    tensors = {}

    def tensors_of(dtype, shape):
        key = (dtype, tuple(shape))
        if key not in tensors:
            tensors.clear()  # one shape at a time on the GPU
            g = torch.Generator(device=device).manual_seed(7)
            x = (torch.rand(shape, generator=g, device=device) * 16 - 8).to(TORCH_DTYPES[dtype])
            dy = (torch.rand(shape, generator=g, device=device) * 4 - 2).to(TORCH_DTYPES[dtype])
            tensors[key] = (x, dy, torch.empty_like(x))
        return tensors[key]

    def region(fn, warmup, repeats):
        times = []
        for r in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                times.append(ms)
        times.sort()
        return times[len(times) // 2]

    def check(cmd):
        inputs = load_inputs(cmd["dir"], device)
        out = {}
        for dtype in TORCH_DTYPES:
            if f"x_{dtype}" not in inputs:
                continue
            x, dy = inputs[f"x_{dtype}"], inputs[f"dy_{dtype}"]
            for op, fn in OPS.items():
                ours = inputs[f"{op}_{dtype}"].view(x.shape)
                ref = fn(x, dy)
                same = (ours == ref) | (torch.isnan(ours) & torch.isnan(ref))
                finite = torch.isfinite(ours) & torch.isfinite(ref)
                # JSON has no NaN: the error in norm over the elements finite in both, and how many are
                # not finite in one but not the other (a different NaN or infinity) counted apart.
                out[f"{op} {dtype}"] = {
                    "rel_err": rel_err(ours[finite], ref[finite]),
                    "bits_differ": float(1 - same.double().mean()),
                    "nonfinite_differ": int((torch.isfinite(ours) != torch.isfinite(ref)).sum() + (torch.isinf(ours) & torch.isinf(ref) & (ours != ref)).sum()),
                }
        return {"check": out}

    def round_(cmd):
        x, dy, y = tensors_of(cmd["dtype"], cmd["shape"])
        w, n = cmd["warmup"], cmd["repeats"]
        ms = {op: region(lambda: fn(x, dy), w, n) for op, fn in OPS.items()}
        ms["copy"] = region(lambda: y.copy_(x), w, n)
        return {"ms": ms}

    emit({"ready": True, "torch": torch.__version__, "device": str(device)})
    serve_commands({"check": check, "round": round_})


if __name__ == "__main__":
    main()
