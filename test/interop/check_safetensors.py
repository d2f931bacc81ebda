"""Interop check, run on a machine with PyTorch and the `safetensors` package (the GPU machine):

    node dist/lib/cli/main.js train --steps 30 --out /tmp/run --no-progress      (writes a checkpoint)
    python3 test/interop/check_safetensors.py /tmp/run/checkpoints

Every shard of the newest checkpoint is opened with safetensors.torch.load_file; each tensor's raw
little-endian bytes must hash to the SHA-256 moe-ep recorded for it in manifest.json (what moe-ep
held when it saved), its dtype and shape must match, and expert tensors must be plain [H, F] /
[F, H] matrices. With --cuda the tensors are also moved to the GPU and back. Prints one line per
file and exits non-zero on any mismatch."""
import hashlib
import json
import os
import sys

import torch
from safetensors.torch import load_file

TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "i32": torch.int32,
                "i64": torch.int64, "u8": torch.uint8, "fp8e4m3": torch.float8_e4m3fn}


def newest(root):
    latest = os.path.join(root, "latest")
    if os.path.exists(latest):
        return os.path.join(root, open(latest).read().strip())
    if os.path.exists(os.path.join(root, "manifest.json")):
        return root
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-"))
    return os.path.join(root, steps[-1])


def raw_bytes(t):
    t = t.contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype == torch.float8_e4m3fn:
        t = t.view(torch.uint8)
    return t.numpy().tobytes()


def main():
    root = sys.argv[1]
    use_cuda = "--cuda" in sys.argv
    d = newest(root)
    manifest = json.load(open(os.path.join(d, "manifest.json")))
    failures = 0
    checked = 0
    for file in manifest["files"]:
        tensors = load_file(os.path.join(d, file))
        for name, t in tensors.items():
            rec = manifest["tensors"].get(name)
            if rec is None:
                print(f"FAIL {file}: {name} is not in the manifest")
                failures += 1
                continue
            if use_cuda:
                t = t.to("cuda").cpu()
            problems = []
            if t.dtype != TORCH_DTYPES[rec["dtype"]]:
                problems.append(f"dtype {t.dtype} vs {rec['dtype']}")
            if list(t.shape) != rec["shape"]:
                problems.append(f"shape {list(t.shape)} vs {rec['shape']}")
            if hashlib.sha256(raw_bytes(t)).hexdigest() != rec["sha256"]:
                problems.append("bytes differ from what moe-ep held")
            if problems:
                print(f"FAIL {file}: {name}: {'; '.join(problems)}")
                failures += 1
            checked += 1
        print(f"{file}: {len(tensors)} tensors read with safetensors/torch")
    missing = set(manifest["tensors"]) - {n for f in manifest["files"] for n in load_file(os.path.join(d, f))}
    for name in sorted(missing):
        print(f"FAIL: {name} is in the manifest but in no file")
        failures += 1
    print(f"{checked} tensors checked, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
