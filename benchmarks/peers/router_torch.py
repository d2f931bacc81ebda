#!/usr/bin/env python3
"""PyTorch peer for benchmarks/router.bench.mjs: the same routing composed from torch ops.

usage: router_torch.py INPUT_DIR CONFIG_JSON REPEATS [SETS INNER]
Expert choice (CONFIG_JSON routing 'expert-choice', with capacity C): softmax/sigmoid, topk(C) over
the token dimension (each expert's C best tokens), the gates scattered into a dense [T,E]; checked
against our slot (chosen where >= 0) and weights.
Token choice:
Loads logits (and bias) written by writeInputs, plus our indices/weights for an agreement check;
times sigmoid/softmax, +bias, group scores (top-m sum), topk of groups, mask, topk, gather,
normalise, and the per-expert counts, with CUDA events (median after warm-up): INNER back-to-back calls per
timed region rotating among SETS copies of the logits (as the benchmark times ours), and one call per
region (single_ms); prints one JSON line.
"""
import json
import os
import sys

import numpy as np
import torch

NP = {"f32": np.float32, "i32": np.int32}


def load(d, name, manifest):
    m = manifest[name]
    a = np.fromfile(os.path.join(d, name + ".bin"), dtype=NP[m["dtype"]]).reshape(m["shape"])
    return torch.from_numpy(a).cuda()


def route(logits, bias, c):
    E, k = c["numExperts"], c["topK"]
    G, kg = c.get("groups", 1), c.get("topkGroups", c.get("groups", 1))
    sig = c.get("scoreFunction", "softmax") == "sigmoid"
    normalize = c.get("normalize", sig)
    scale = c.get("routeScale", 1.0)
    scores = torch.sigmoid(logits) if sig else torch.softmax(logits, dim=-1)
    biased = scores + bias if bias is not None else scores
    if G > 1:
        T = logits.shape[0]
        g = biased.view(T, G, E // G).topk(k // kg, dim=-1).values.sum(-1)
        keep = g.topk(kg, dim=-1, sorted=False).indices
        mask = torch.zeros_like(g).scatter_(1, keep, 1.0)
        mask = mask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
        biased = biased.masked_fill(mask == 0, float("-inf"))
    idx = biased.topk(k, dim=-1).indices
    w = scores.gather(1, idx)
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * scale
    # Not torch.bincount: on CUDA it reads the maximum back to the host, a sync our router never makes.
    flat = idx.flatten()
    counts = torch.zeros(E, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    return idx, w, scores, counts


def route_expert_choice(logits, c):
    scores = torch.sigmoid(logits) if c.get("scoreFunction", "softmax") == "sigmoid" else torch.softmax(logits, dim=-1)
    vals, idx = scores.topk(c["capacity"], dim=0)  # [C, E]: each expert's top-C tokens
    weights = torch.zeros_like(scores).scatter_(0, idx, vals * c.get("routeScale", 1.0))
    return scores, idx, weights


def main():
    d, cfg, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    sets = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    inner = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    manifest = json.load(open(os.path.join(d, "inputs.json")))
    logits = load(d, "logits", manifest)
    if cfg.get("routing") == "expert-choice":
        return main_expert_choice(d, cfg, repeats, sets, inner, manifest, logits)
    bias = load(d, "bias", manifest) if "bias" in manifest else None
    ours_idx = load(d, "indices", manifest).long()
    ours_w = load(d, "weights", manifest)
    # copies of the logits to rotate among, as the benchmark does for ours (inputs not found in L2)
    pool = [logits] + [logits.clone() for _ in range(sets - 1)]
    for _ in range(5):
        route(logits, bias, cfg)
    torch.cuda.synchronize()

    def timed(n):
        times = []
        call = 0
        for _ in range(repeats):
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(n):
                route(pool[call % sets], bias, cfg)
                call += 1
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / n)
        times.sort()
        return times[len(times) // 2]

    ms = timed(inner)
    single_ms = timed(1)
    idx, w, _, _ = route(logits, bias, cfg)
    agree = (idx == ours_idx).float().mean().item()
    same_row = (idx == ours_idx).all(dim=1)
    wdiff = (w - ours_w)[same_row].abs().max().item() if same_row.any() else float("nan")
    print(json.dumps({"ms": ms, "single_ms": single_ms, "index_agreement": agree, "weight_max_abs_diff": wdiff,
                      "torch": torch.__version__}))


def main_expert_choice(d, cfg, repeats, sets, inner, manifest, logits):
    ours_chosen = load(d, "slot", manifest) >= 0
    ours_w = load(d, "weights", manifest)
    pool = [logits] + [logits.clone() for _ in range(sets - 1)]
    for _ in range(5):
        route_expert_choice(logits, cfg)
    torch.cuda.synchronize()

    def timed(n):
        times = []
        call = 0
        for _ in range(repeats):
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(n):
                route_expert_choice(pool[call % sets], cfg)
                call += 1
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / n)
        times.sort()
        return times[len(times) // 2]

    ms = timed(inner)
    single_ms = timed(1)
    _, idx, w = route_expert_choice(logits, cfg)
    chosen = torch.zeros_like(ours_chosen).scatter_(0, idx, True)
    agree = (chosen == ours_chosen).float().mean().item()
    both = chosen & ours_chosen
    wdiff = (w - ours_w)[both].abs().max().item() if both.any() else float("nan")
    print(json.dumps({"ms": ms, "single_ms": single_ms, "chosen_agreement": agree, "weight_max_abs_diff": wdiff,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
