"""Shared by the PyTorch peer scripts: load the inputs a benchmark wrote (harness.mjs writeInputs),
whole (load_inputs) or one at a time streamed through a pinned buffer (load_streamed), time a
callable with CUDA events (median over repeats after warm-up), and, for a peer kept alive by the
benchmark, exit when the benchmark is gone (watch_parent)."""
import json
import math
import os
import sys
import threading
import time

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


# load_streamed: the torch dtype of each manifest dtype, and the raw bits' type while reading (bf16
# read as int16, then viewed as bfloat16).
TORCH_DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16, "i32": torch.int32, "i64": torch.int64, "u8": torch.uint8}
RAW_DTYPES = {"bf16": torch.int16, "f32": torch.float32, "f16": torch.float16, "i32": torch.int32, "i64": torch.int64, "u8": torch.uint8}


def watch_parent():
    """Exit when the benchmark that started us is gone (killed by its own timeout, say), even while
    busy loading or timing: no peer outlives it holding the GPU."""
    parent = os.getppid()

    def loop():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=loop, daemon=True).start()


def load_streamed(folder, manifest, name, device, transform=None, chunk_bytes=256 << 20):
    """One input onto `device`, streamed along dim 0 in chunks of at most chunk_bytes through one
    (pinned, on CUDA) host buffer; transform(chunk) → the chunk as stored (same shape). `manifest`:
    the folder's inputs.json (harness.mjs writeInputs), loaded."""
    meta = manifest[name]
    shape, dt = list(meta["shape"]), meta["dtype"]
    raw_t, torch_t = RAW_DTYPES[dt], TORCH_DTYPES[dt]
    rows = shape[0] if shape else 1
    row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
    item = torch.empty(0, dtype=raw_t).element_size()
    step = max(1, chunk_bytes // max(1, row_elems * item))
    step = min(step, max(rows, 1))
    out = torch.empty(shape, dtype=torch_t, device=device)
    buf = torch.empty(step * row_elems, dtype=raw_t, pin_memory=device.type == "cuda")
    path = os.path.join(folder, name + ".bin")
    with open(path, "rb", buffering=0) as f:
        for start in range(0, rows, step):
            n = min(step, rows - start)
            host = buf[: n * row_elems]
            mv = memoryview(host.numpy()).cast("B")
            got = 0
            while got < len(mv):
                r = f.readinto(mv[got:])
                if not r:
                    raise RuntimeError(f"{path}: ended after {start * row_elems * item + got} bytes; the manifest says {shape} {dt}")
                got += r
            chunk = host.view(torch_t).view([n] + shape[1:]).to(device)
            if transform is not None:
                chunk = transform(chunk)
            out[start : start + n].copy_(chunk)
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


def grouped_mm_loop(a, b, offs=None, out_dtype=None):
    """torch._grouped_mm's 2d x 3d and 2d x 2d products group by group (CPU dry runs with an older
    torch only). 2d x 3d: rows past the last offset are zeros here (torch leaves them undefined)."""
    outs, start = [], 0
    ends = offs.tolist()
    if b.dim() == 3:  # a [M, K] x b [E, K, N] -> [M, N]
        for e, end in enumerate(ends):
            outs.append(a[start:end] @ b[e])
            start = end
        if start < a.shape[0]:
            outs.append(a.new_zeros(a.shape[0] - start, b.shape[-1]))
        out = torch.cat(outs)
    else:  # a [K, M] (a transposed view) x b [M, N] -> [E, K, N]
        for end in ends:
            outs.append(a[:, start:end] @ b[start:end])
            start = end
        out = torch.stack(outs)
    return out if out_dtype is None else out.to(out_dtype)


def grouped_mm_for(device):
    """torch._grouped_mm, or on the CPU of a torch without it the loop above: (function, what it is)."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is not None:
        return fn, "torch._grouped_mm"
    if device.type == "cuda":
        raise SystemExit(f"torch {torch.__version__} has no torch._grouped_mm (2.8 or later needed)")
    return grouped_mm_loop, "a matmul per group (this torch has no _grouped_mm; CPU dry run)"


def serve_commands(handlers, on_error=None):
    """Answers one JSON line per request on stdin until "quit" or end of input: handlers[cmd](request)
    is emitted; a failed request is reported as {"error"} (on_error(name) runs first) and the next
    may still run."""
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        name = cmd.get("cmd")
        if name == "quit":
            break
        handler = handlers.get(name)
        if handler is None:
            emit({"error": f"unknown command {cmd!r}"})
            continue
        try:
            emit(handler(cmd))
        except Exception as e:
            if on_error is not None:
                on_error(name)
            emit({"error": f"{type(e).__name__}: {e}"})
