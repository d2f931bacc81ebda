"""PyTorch peer for benchmarks/grouped-gemm.bench.mjs: torch._grouped_mm on the same inputs as ours,
timed with CUDA events in the same run, block by block, alternating with ours in rounds.

usage: grouped_gemm_torch.py [cuda | cpu]

Kept alive by the benchmark for the whole run and driven through stdin/stdout (one JSON line per
request, one JSON line per answer). It first prints {"ready": true, "torch", "device",
"grouped_mm"}; then:
  {"cmd": "shape", "dir": D, "inputs": {"a": KEY, "b": KEY, "dC": KEY[, "w2": KEY]}, "keep": [KEY, ...],
   "checks": [...]}: makes the shape current. Inputs it does not hold yet are in D (harness.mjs
      writeInputs, file name = KEY), with the shape's offsets [E+1] i32 ("offsets") and our outputs'
      check slices; it keeps by KEY every input it loads and drops those outside keep and inputs
      (the benchmark hands an input over once, however many shapes use it). Then it computes each
      product once and compares the check slices with ours: each check is {"product", "file",
      "rows": [start, count]} (rows of the NN or NT output) or {"product", "file", "expert": e,
      "krows": r} (the first r rows of expert e's [K, N] dW); per product the relative error in
      norm over all its slices. Answers {"relErr": {product: x}, "errors": {product: message},
      "tn32": how this torch makes dW with fp32 results, "load_s", "check_s", "held": [KEY, ...]
      (what it holds now), "held_gb"}.
  {"cmd": "time", "product": P, "warmup": W, "calls": N, "inner": I}: one timed block of product P
      on the current shape: the median over N regions (after W untimed) of the ms per call, I
      back-to-back calls per region, CUDA events around each region, the device idle at its start.
      Answers {"product": P, "ms": median}.
  {"cmd": "quit"} (or the end of stdin, or the benchmark's death): exits.

Products (a [M,K], b [E,K,N], dC [M,N] bf16; offs = the cumulative ends of the groups, int32):
  NN    torch._grouped_mm(a, b, offs)                  [M, N]    the forward
  NT    torch._grouped_mm(dC, b.transpose(-2, -1), offs) [M, K]  dA
  TN    torch._grouped_mm(a.t(), dC, offs)              [E, K, N] dW, bf16
  TN32  dW with fp32 results (what training keeps): out_dtype=torch.float32 where this torch takes
        it; where it refuses (torch's grouped mm writes the inputs' dtype), the bf16 dW then
        .float(): what a bf16 torch training step hands its fp32 master weights. "tn32" says which.
With w2 [E, N/2, K] (the shapes the benchmark marks fused: K = H, N = 2F), the fused epilogues done
the unfused way, each op rounding to bf16 as eager torch does:
  SWIGLU   g = torch._grouped_mm(a, b, offs); h = silu(g[:, 0::2]) * g[:, 1::2]     h [M, N/2]
  DH       torch._grouped_mm(a, w2.transpose(-2, -1), offs)                       dh [M, N/2]
  DSWIGLU  dh as DH; from the saved g (made once per shape by this peer's own forward) what
           autograd runs for silu(g1) * g3: dG[:, 0::2] = silu_backward(dh * g3, g1),
           dG[:, 1::2] = dh * silu(g1) (silu(g1) saved by the forward)            dG [M, N]
A torch without torch._grouped_mm (older than 2.8) gets a loop of matmuls per group in its place,
on the CPU only (dry runs of the script): "grouped_mm" then says so.
"""
import json
import os
import sys
import time

import torch

from common import emit, grouped_mm_for, load_streamed, serve_commands, watch_parent

PRODUCTS = ("NN", "NT", "TN", "TN32", "SWIGLU", "DH", "DSWIGLU")




def main():
    watch_parent()
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    on_gpu = device.type == "cuda"
    grouped_mm, grouped_mm_is = grouped_mm_for(device)
    if on_gpu:
        torch.cuda.init()
    emit(
        {
            "ready": True,
            "torch": torch.__version__,
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if on_gpu else ""),
            "grouped_mm": grouped_mm_is,
        }
    )

    held = {}  # KEY -> input tensor on the device
    cur = {}  # the current shape: "fn" (product -> callable), "tn32"

    def sync():
        if on_gpu:
            torch.cuda.synchronize(device)

    def shape(cmd):
        t0 = time.perf_counter()
        inputs = cmd["inputs"]
        keep = set(cmd.get("keep", [])) | set(inputs.values())
        cur.clear()
        for k in [k for k in held if k not in keep]:
            del held[k]
        if on_gpu:
            torch.cuda.empty_cache()
        folder = cmd.get("dir")
        manifest = json.load(open(os.path.join(folder, "inputs.json"))) if folder else {}
        for key in inputs.values():
            if key not in held:
                if key not in manifest:
                    raise RuntimeError(f"input {key} neither held nor handed over")
                held[key] = load_streamed(folder, manifest, key, device)
        offsets = load_streamed(folder, manifest, "offsets", device)
        chk = {c["file"]: load_streamed(folder, manifest, c["file"], device) for c in cmd.get("checks", [])}
        sync()
        load_s = time.perf_counter() - t0

        a, b, dc = held[inputs["a"]], held[inputs["b"]], held[inputs["dC"]]
        ends = offsets[1:].contiguous()  # torch wants the cumulative end of each group
        at, bt = a.t(), b.transpose(-2, -1)
        fn = {
            "NN": lambda: grouped_mm(a, b, offs=ends),
            "NT": lambda: grouped_mm(dc, bt, offs=ends),
            "TN": lambda: grouped_mm(at, dc, offs=ends),
        }
        # dW with fp32 results: out_dtype where this torch takes it, else the bf16 dW cast.
        tn32 = "torch._grouped_mm(a.t(), dC, offs, out_dtype=torch.float32)"
        if grouped_mm_is != "torch._grouped_mm":
            tn32 = "a matmul per group (CPU dry run), results cast to float32"
        errors = {}
        try:
            out = grouped_mm(at, dc, offs=ends, out_dtype=torch.float32)
            if out.dtype != torch.float32:
                raise RuntimeError(f"out_dtype=float32 gave {out.dtype}")
            del out
            fn["TN32"] = lambda: grouped_mm(at, dc, offs=ends, out_dtype=torch.float32)
        except (RuntimeError, TypeError) as e:
            tn32 = f"torch._grouped_mm(a.t(), dC, offs).float() (out_dtype=float32 refused: {str(e).splitlines()[0][:160]})"
            fn["TN32"] = lambda: grouped_mm(at, dc, offs=ends).float()

        # The fused epilogues (shapes with w2), the unfused way.
        if "w2" in inputs:
            w2 = held[inputs["w2"]]
            w2t = w2.transpose(-2, -1)
            g_saved = grouped_mm(a, b, offs=ends)  # the forward's saved g, this peer's own
            g1, g3 = g_saved[:, 0::2], g_saved[:, 1::2]
            silu_g1 = torch.nn.functional.silu(g1)  # what autograd saves for the mul's backward

            def swiglu():
                g = grouped_mm(a, b, offs=ends)
                return torch.nn.functional.silu(g[:, 0::2]) * g[:, 1::2]

            def dswiglu():
                dh = grouped_mm(a, w2t, offs=ends)
                dg = torch.empty_like(g_saved)
                dg[:, 0::2] = torch.ops.aten.silu_backward(dh * g3, g1)
                dg[:, 1::2] = dh * silu_g1
                return dg

            fn["SWIGLU"] = swiglu
            fn["DH"] = lambda: grouped_mm(a, w2t, offs=ends)
            fn["DSWIGLU"] = dswiglu

        # The check: each product once, our slices against torch's.
        t1 = time.perf_counter()
        rel = {}
        for p in [q for q in PRODUCTS if q in fn]:
            mine = [c for c in cmd.get("checks", []) if c["product"] == p]
            try:
                out = fn[p]()
            except RuntimeError as e:  # e.g. group sizes this torch's dW refuses
                errors[p] = str(e).splitlines()[0][:300]
                fn.pop(p)
                continue
            if mine:
                num = den = 0.0
                for c in mine:
                    if "rows" in c:
                        s, n = c["rows"]
                        ref = out[s : s + n]
                    else:
                        ref = out[c["expert"], : c["krows"]]
                    ours = chk[c["file"]]
                    ref64, ours64 = ref.double(), ours.double()
                    num += float(((ours64 - ref64) ** 2).sum())
                    den += float((ref64**2).sum())
                rel[p] = (num / max(den, 1e-30)) ** 0.5
            del out
        chk.clear()
        sync()
        cur.update(fn=fn, tn32=tn32)
        held_gb = sum(t.numel() * t.element_size() for t in held.values()) / 1e9
        return {
            "relErr": rel,
            "errors": errors,
            "tn32": tn32,
            "load_s": load_s,
            "check_s": time.perf_counter() - t1,
            "held": sorted(held),
            "held_gb": held_gb,
        }

    def timed(cmd):
        p = cmd["product"]
        if "fn" not in cur:
            raise RuntimeError("no current shape")
        if p not in cur["fn"]:
            raise RuntimeError(f"{p} is not available on this shape")
        f = cur["fn"][p]
        warmup, calls, inner = int(cmd.get("warmup", 2)), int(cmd.get("calls", 10)), int(cmd.get("inner", 1))
        times = []
        for i in range(warmup + calls):
            sync()
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    f()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t = time.perf_counter()
                for _ in range(inner):
                    f()
                ms = (time.perf_counter() - t) * 1e3
            if i >= warmup:
                times.append(ms / inner)
        times.sort()
        return {"product": p, "ms": times[len(times) // 2]}

    def forget_shape(name):
        if name == "shape":
            cur.clear()  # no current shape: its time requests answer with an error

    serve_commands({"shape": shape, "time": timed}, on_error=forget_shape)

if __name__ == "__main__":
    main()
