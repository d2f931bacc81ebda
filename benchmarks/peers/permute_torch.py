"""PyTorch peer for benchmarks/permute.bench.mjs: the same inputs (written by writeInputs), timed
with CUDA events in the same run. Prints one JSON object.

  permute:   rows = x.index_select(0, rowToken)   (padding rows then zeroed with a mask)
  unpermute: y = zeros; y.index_add_(0, rowToken, rows * rowWeight[:, None])
"""
import json
import os
import sys

import numpy as np
import torch

NP = {"bf16": np.uint16, "f32": np.float32, "i32": np.int32}


def load(d, name, meta):
    m = meta[name]
    a = np.fromfile(os.path.join(d, f"{name}.bin"), dtype=NP[m["dtype"]]).reshape(m["shape"])
    t = torch.from_numpy(a.copy())
    if m["dtype"] == "bf16":
        t = t.view(torch.bfloat16)
    return t.cuda()


def time_ms(fn, repeats, inner=1):
    """Median ms per call, `inner` back-to-back calls per event-timed region (as the benchmark times ours)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / inner)
    times.sort()
    return times[len(times) // 2]


def main():
    d, repeats = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 50
    inner = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    meta = json.load(open(os.path.join(d, "inputs.json")))
    x = load(d, "x", meta)
    rows = load(d, "rows", meta)
    tok = load(d, "rowToken", meta).long()
    rw = load(d, "rowWeight", meta)
    valid = tok >= 0
    src = tok.clamp(min=0)

    def do_permute():
        r = x.index_select(0, src)
        r.masked_fill_(~valid[:, None], 0)
        return r

    def do_unpermute():
        y = torch.zeros_like(x, dtype=torch.float32)
        y.index_add_(0, src, rows.float() * rw[:, None])
        return y.to(torch.bfloat16)

    # Same answer as ours (checked here so a timing never stands for a wrong result).
    assert torch.equal(do_permute(), rows), "torch permute disagrees with moe-ep rows"
    out = {
        "torch": torch.__version__,
        "permute_ms": time_ms(do_permute, repeats, inner),
        "unpermute_ms": time_ms(do_unpermute, repeats, inner),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
