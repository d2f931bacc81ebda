"""PyTorch peer for benchmarks/grouped-gemm.bench.mjs: times torch._grouped_mm on the same inputs
(forward, dA, dW) and a dense bf16 matmul of the same FLOPs, and checks our forward output.
usage: grouped_gemm_torch.py <inputs folder> <repeats>"""
import sys

import torch

from common import emit, load_inputs, rel_err, time_cuda

folder, repeats = sys.argv[1], int(sys.argv[2])
x = load_inputs(folder)
a, b, dc, offsets, ours = x["a"], x["b"], x["dC"], x["offsets"], x["oursNN"]
ends = offsets[1:].contiguous()  # torch wants the cumulative end of each group
M, K = a.shape
E, _, N = b.shape

ref = torch._grouped_mm(a, b, offs=ends)
result = {"relErrNN": rel_err(ours[: int(ends[-1])], ref[: int(ends[-1])])}
result["torchNN"] = time_cuda(lambda: torch._grouped_mm(a, b, offs=ends), repeats=repeats)
bt = b.transpose(-2, -1)
result["torchNT"] = time_cuda(lambda: torch._grouped_mm(dc, bt, offs=ends), repeats=repeats)
try:
    at = a.t()
    result["torchTN"] = time_cuda(lambda: torch._grouped_mm(at, dc, offs=ends), repeats=repeats)
except RuntimeError as e:  # e.g. group sizes that are not multiples of 8
    result["torchTN"] = None
    result["torchTNError"] = str(e).split("\n")[0]
# A dense product with the same FLOPs: [M, K] x [K, N].
w = b[0].contiguous()
result["denseMM"] = time_cuda(lambda: torch.mm(a, w), repeats=repeats)
emit(result)
