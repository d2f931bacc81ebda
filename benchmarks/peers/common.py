"""Shared by the PyTorch peer scripts: load the inputs a benchmark wrote (harness.mjs writeInputs)
and time a callable with CUDA events (median over repeats after warm-up)."""
import json
import os
import sys

import numpy as np
import torch

DTYPES = {"f32": (np.float32, torch.float32), "bf16": (np.int16, torch.bfloat16), "f16": (np.float16, torch.float16),
          "i32": (np.int32, torch.int32), "i64": (np.int64, torch.int64), "u8": (np.uint8, torch.uint8)}


def load_inputs(folder, device="cuda"):
    manifest = json.load(open(os.path.join(folder, "inputs.json")))
    out = {}
    for name, meta in manifest.items():
        np_type, torch_type = DTYPES[meta["dtype"]]
        raw = np.fromfile(os.path.join(folder, name + ".bin"), dtype=np_type).reshape(meta["shape"])
        t = torch.from_numpy(raw)
        if meta["dtype"] == "bf16":
            t = t.view(torch.bfloat16)
        out[name] = t.to(device)
    return out


def time_cuda(fn, warmup=5, repeats=50):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
