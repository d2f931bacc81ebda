"""PyTorch peer for benchmarks/activation.bench.mjs: the activations and the backward kernels torch's
autograd calls for them, on the GPU, timed with CUDA events in the same run as ours.

usage: activation_torch.py [cuda | cpu]

Kept alive by the benchmark and driven through stdin/stdout: after starting it prints one JSON line
({"ready": true, "torch"}); then it answers each JSON line on stdin with one:
  {"cmd": "check", "dir": D}: ours against torch on the same inputs (D, harness.mjs writeInputs:
      x_<dtype>, dy_<dtype>, and our <op>_<dtype> for each op): per op and dtype the relative error
      in norm over the random inputs (|x| <= 100), the share of elements whose bits differ, and the
      elements whose non-finite class differs ({"check": {"<op> <dtype>": {...}}});
  {"cmd": "round", "dtype": "bf16", "shape": [R, C], "warmup": W, "repeats": N, "inner": I}: one
      round of every op on torch's own random tensors of that shape and dtype, and a device copy of
      x ({"ms": {op: ms per call}}, median over N regions of I back-to-back calls after W); the
      values do not change the time of these elementwise kernels;
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


def nonfinite_class(t):
    """0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return torch.where(torch.isnan(t), 1, torch.where(torch.isposinf(t), 2, torch.where(torch.isneginf(t), 3, 0)))


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

    def region(fn, warmup, repeats, inner):
        times = []
        for r in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                ms = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                times.append(ms / inner)
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
                bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[x.dtype]
                # Bits, not values (+0 against -0 differs); two NaN count as the same.
                same = (ours.view(bits) == ref.view(bits)) | (torch.isnan(ours) & torch.isnan(ref))
                # The error in norm over the random inputs only: the edges (±1e20 passes through the
                # forwards) would swamp the norm; JSON has no NaN, so non-finite results are counted
                # apart by class (NaN, +inf, -inf) where either side is not finite.
                judged = torch.isfinite(ours) & torch.isfinite(ref) & (x.float().abs() <= 100)
                out[f"{op} {dtype}"] = {
                    "rel_err": rel_err(ours[judged], ref[judged]),
                    "bits_differ": float(1 - same.double().mean()),
                    "nonfinite_differ": int(((nonfinite_class(ours) != nonfinite_class(ref)) & ~(torch.isfinite(ours) & torch.isfinite(ref))).sum()),
                }
        return {"check": out}

    def round_(cmd):
        x, dy, y = tensors_of(cmd["dtype"], cmd["shape"])
        w, n, inner = cmd["warmup"], cmd["repeats"], cmd["inner"]
        ms = {op: region(lambda: fn(x, dy), w, n, inner) for op, fn in OPS.items()}
        ms["copy"] = region(lambda: y.copy_(x), w, n, inner)
        return {"ms": ms}

    emit({"ready": True, "torch": torch.__version__, "device": str(device)})
    serve_commands({"check": check, "round": round_})


if __name__ == "__main__":
    main()
