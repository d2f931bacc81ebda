"""The tensor-core roof under the GPU's power limit: PyTorch's own GEMMs run back to back for a few
seconds each (long enough for the power controller to settle), with nvidia-smi sampling the SM
clock and the power draw meanwhile. A short timed burst on an idle GPU runs at the boost clock; a
training step runs at whatever clock the power limit allows, so this is the roof the layer's
grouped GEMMs meet in a step (issue 20).

  python3 benchmarks/peers/power_roof.py [--seconds 3] [--out FILE.json]

Cases (bf16, the layer's main shape: T·k = 32768 rows, H = 7168, 2F = 4096, E = 32 balanced):
  matmul_up    torch.matmul [32768, 7168] x [7168, 4096]
  grouped_up   torch._grouped_mm, the up projection (NN)
  grouped_down torch._grouped_mm, the down projection (NN: K = 2048, N = 7168)
  grouped_dw13 torch._grouped_mm, the up projection's dW (TN), bf16 results (torch writes the
               inputs' dtype)
  idle         nothing launched (the GPU's idle clock and power)
Per case: launches, ms a launch (wall clock over the soak / launches), TFLOP/s, and the median SM
clock (MHz) and power (W) over the soak's samples after its first 0.5 s (power.draw.instant where
the driver has it, else power.draw, a 1 s average). The power limit is read once (power.limit).
"""

import argparse
import json
import os
import statistics
import subprocess
import time

import torch


def smi_gpu():
    # The nvidia-smi id of cuda:0: the first entry of CUDA_VISIBLE_DEVICES (an index or a UUID), else 0.
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return first if first else "0"


def smi_query(fields):
    r = subprocess.run(["nvidia-smi", "-i", smi_gpu(), f"--query-gpu={fields}", "--format=csv,noheader,nounits"], capture_output=True, text=True)
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


def as_float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# power.draw is a 1 s average on recent drivers; power.draw.instant, where there is one, is not.
POWER_FIELD = "power.draw.instant" if smi_query("power.draw.instant") is not None else "power.draw"


def soak(label, flops, launch, seconds):
    # nvidia-smi samples every 20 ms for the whole soak. The lines carry no time: they are taken as
    # evenly spread over the soak, and those of its first 0.5 s (the clock settling) are left out.
    smi = subprocess.Popen(
        ["nvidia-smi", "-i", smi_gpu(), f"--query-gpu=clocks.sm,{POWER_FIELD}", "--format=csv,noheader,nounits", "-lms", "20"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        torch.cuda.synchronize()
        t0 = time.time()
        launches = 0
        while time.time() - t0 < seconds:
            for _ in range(10):
                launch()
            torch.cuda.synchronize()
            launches += 10
        wall = time.time() - t0
    finally:
        smi.terminate()
    out, _ = smi.communicate()
    samples = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            samples.append((float(parts[0]), float(parts[1])))
        except (ValueError, IndexError):
            pass
    # The samples arrive evenly over the soak: keep those after its first 0.5 s.
    skip = int(len(samples) * min(0.5 / max(wall, 1e-9), 0.9))
    kept = samples[skip:]
    ms = wall * 1e3 / max(launches, 1)
    row = {
        "case": label,
        "launches": launches,
        "ms_per_launch": round(ms, 4),
        "tflops": round(flops / (ms * 1e-3) / 1e12, 1) if flops else None,
        "sm_clock_mhz_median": statistics.median(s[0] for s in kept) if kept else None,
        "power_w_median": statistics.median(s[1] for s in kept) if kept else None,
        "samples": len(kept),
    }
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    T, H, F, E = 32768, 7168, 2048, 32
    g = torch.Generator(device=dev).manual_seed(20261203)
    print(f"seed 20261203, {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)

    def randn(*shape):
        return (torch.randn(*shape, device=dev, generator=g) * 0.05).to(torch.bfloat16)

    x = randn(T, H)
    w13 = randn(E, H, 2 * F)
    w2 = randn(E, F, H)
    h = randn(T, F)
    dg = randn(T, 2 * F)
    w_dense = randn(H, 2 * F)
    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * (T // E)
    up_flops = 2.0 * T * H * 2 * F
    down_flops = 2.0 * T * F * H
    rows = [
        soak("idle", 0, lambda: time.sleep(0.01), min(args.seconds, 2.0)),
        soak("matmul_up", up_flops, lambda: torch.matmul(x, w_dense), args.seconds),
        soak("grouped_up", up_flops, lambda: torch._grouped_mm(x, w13, offs), args.seconds),
        soak("grouped_down", down_flops, lambda: torch._grouped_mm(h, w2, offs), args.seconds),
        soak("grouped_dw13", up_flops, lambda: torch._grouped_mm(x.t(), dg, offs), args.seconds),
    ]
    result = {
        "what": "torch GEMMs soaked under the power limit (benchmarks/peers/power_roof.py)",
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "power_limit_w": as_float(smi_query("power.limit")),
        "max_sm_clock_mhz": as_float(smi_query("clocks.max.sm")),
        "power_field": POWER_FIELD,
        "seconds_per_case": args.seconds,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
