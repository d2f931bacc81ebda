"""PyTorch peer for benchmarks/dispatch.bench.mjs: torch.distributed all_to_all_single on the same
layout (the same rows and split sizes per rank), timed with CUDA events in the same run.

usage: dispatch_torch.py <inputs folder> <repeats> [nccl | gloo | gloo-staged | cpu] [cuda | cpu]
  Started by dispatch.bench.mjs on every rank (one python process per Node rank) with RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; the processes form one torch.distributed
  group. It can also run by itself: `mpirun -np N python3 dispatch_torch.py <folder> 50` (with
  MASTER_ADDR and MASTER_PORT exported) on a folder holding rank<r>/ inputs that the benchmark
  left (it removes them unless the peer is skipped).
  nccl:        one GPU per rank (or one rank): all_to_all_single of device tensors.
  gloo-staged: ranks sharing a GPU (our MPI backend): device → pinned host copy, gloo all-to-all,
               host → device copy, like our MPI backend's staging.
  gloo:        gloo on the tensors where they are (CPU tensors in a dry run).
  cpu:         the same as `gloo cpu` (older spelling).
  The last argument is the device (default cuda; cpu in the benchmark's --dry-run, wall-clock
  timing: `gloo-staged cpu` runs the staging copies through unpinned host buffers).

Inputs (harness.mjs writeInputs): x [T,H] bf16, rowToken [R] i32 (our permuted order: rows grouped
by global expert, so by destination rank), rowWeight [R] f32, sendRows [P] i32, recvRows [P] i32,
and sendTokenRows [P] i32, recvTokenRows [P] i32: the unique (token, destination rank) rows, what
the 'ipc' transport moves (a token's row once per rank holding any of its experts).
Times:
  dispatch_a2a_ms:  all_to_all_single of the permuted rows (sendRows out, recvRows in)
  dispatch_fp8_a2a_ms: the same rows at the FP8 dispatch's size: H + H/128·4 bytes a row (e4m3
                    values with their fp32 scales, packed; no quantisation)
  combine_a2a_ms:   the way back (recvRows out, sendRows in)
  dispatch_full_ms: x.index_select(0, rowToken) then the all-to-all (our dispatch also regroups)
  combine_full_ms:  the all-to-all back then y.index_add_(0, rowToken, rows·rowWeight) in fp32
  dispatch_tok_a2a_ms, dispatch_fp8_tok_a2a_ms, combine_tok_a2a_ms: the same three all-to-alls on
                    the unique (token, destination rank) split sizes: the bytes 'ipc' moves
Prints one JSON object (its last line).
"""
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

from common import emit, load_inputs


def env_int(*names, default=0):
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return default


def main():
    folder, repeats = sys.argv[1], int(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "nccl"
    where = sys.argv[4] if len(sys.argv) > 4 else ("cpu" if mode == "cpu" else "cuda")
    if mode == "cpu":
        mode = "gloo"
    assert mode in ("nccl", "gloo", "gloo-staged"), f"unknown mode {mode}"
    assert where in ("cuda", "cpu"), f"unknown device {where}"
    assert not (mode == "nccl" and where == "cpu"), "nccl needs CUDA tensors"
    rank = env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    world = env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default=1)
    local = env_int("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
    warmup = env_int("MOE_PEER_WARMUP", default=5)
    if os.path.isdir(os.path.join(folder, f"rank{rank}")):
        folder = os.path.join(folder, f"rank{rank}")

    if where == "cpu":
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = "nccl" if mode == "nccl" else "gloo"
    staged = mode == "gloo-staged"
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT", "29511")
    kw = {"device_id": device} if backend == "nccl" else {}
    # 45 s: a peer that died takes the others down within the Node ranks' 60 s collective timeout,
    # so every rank comes back from the peer round and the ranks stay in step.
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=45), **kw)

    inp = load_inputs(folder, device=device)
    x = inp["x"]
    tok = inp["rowToken"].long()
    rw = inp["rowWeight"]
    send = [int(v) for v in inp["sendRows"].cpu().tolist()]
    recv = [int(v) for v in inp["recvRows"].cpu().tolist()]
    send_tok = [int(v) for v in inp["sendTokenRows"].cpu().tolist()]
    recv_tok = [int(v) for v in inp["recvTokenRows"].cpu().tolist()]
    T, H = x.shape
    R, Rr = tok.numel(), sum(recv)
    assert R == sum(send), f"rank {rank}: {R} permuted rows but sendRows sums to {sum(send)}"
    src = tok.clamp(min=0)  # dropless without alignment: no padding rows (-1)

    rows = x.index_select(0, src)
    recv_buf = torch.empty(Rr, H, dtype=x.dtype, device=device)
    back_buf = torch.empty(R, H, dtype=x.dtype, device=device)
    # FP8-sized rows: e4m3 values + one fp32 scale per 128 values, packed per row (bytes only).
    fp8_row = H + (H // 128) * 4
    rows8 = torch.zeros(R, fp8_row, dtype=torch.uint8, device=device)
    recv8 = torch.empty(Rr, fp8_row, dtype=torch.uint8, device=device)
    # Unique token rows (what 'ipc' moves): the bytes only; the first rows of x stand in for them.
    Rt, Rtr = sum(send_tok), sum(recv_tok)
    tok_rows = x.repeat((Rt + T - 1) // T, 1)[:Rt].contiguous()
    tok_recv = torch.empty(Rtr, H, dtype=x.dtype, device=device)
    tok_rows8 = torch.zeros(Rt, fp8_row, dtype=torch.uint8, device=device)
    tok_recv8 = torch.empty(Rtr, fp8_row, dtype=torch.uint8, device=device)
    tok_back = torch.empty(Rt, H, dtype=x.dtype, device=device)
    pin = device.type == "cuda"
    if staged:  # pinned host buffers, made once (our MPI backend stages through pinned memory)
        most = max(R, Rr, Rt, Rtr)
        host_send = torch.empty(most * 2 * H, dtype=torch.uint8, pin_memory=pin)
        host_recv = torch.empty(most * 2 * H, dtype=torch.uint8, pin_memory=pin)

    def a2a(out, src_rows, out_splits, in_splits):
        # Rows travel as their bytes (uint8 [rows, row bytes]): every backend handles uint8.
        ob, sb = out.view(torch.uint8), src_rows.view(torch.uint8)
        if staged:
            hs = host_send[: sb.numel()].view(sb.shape)
            hr = host_recv[: ob.numel()].view(ob.shape)
            hs.copy_(sb)
            dist.all_to_all_single(hr, hs, out_splits, in_splits)
            ob.copy_(hr)
        else:
            dist.all_to_all_single(ob, sb, out_splits, in_splits)

    def dispatch_a2a():
        a2a(recv_buf, rows, recv, send)

    def dispatch_fp8_a2a():
        a2a(recv8, rows8, recv, send)

    def combine_a2a():
        a2a(back_buf, recv_buf, send, recv)

    def dispatch_tok_a2a():
        a2a(tok_recv, tok_rows, recv_tok, send_tok)

    def dispatch_tok_fp8_a2a():
        a2a(tok_recv8, tok_rows8, recv_tok, send_tok)

    def combine_tok_a2a():
        a2a(tok_back, tok_recv, send_tok, recv_tok)

    def dispatch_full():
        r = x.index_select(0, src)
        a2a(recv_buf, r, recv, send)

    def combine_full():
        a2a(back_buf, recv_buf, send, recv)
        y = torch.zeros(T, H, dtype=torch.float32, device=device)
        y.index_add_(0, src, back_buf.float() * rw[:, None])
        return y.to(x.dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def align():
        sync()
        if world > 1:
            dist.barrier()
            sync()

    def timed(fn):
        times = []
        for i in range(warmup + repeats):
            align()
            if device.type == "cuda":
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
            if i >= warmup:
                times.append(ms)
        times.sort()
        return times[len(times) // 2]

    out = {"torch": torch.__version__, "backend": backend + (" (host-staged)" if staged else ""), "device": str(device),
           "rank": rank, "world": world, "warmup": warmup, "repeats": repeats}
    # Check: dispatch then combine of the rows gives x · Σ_j w[t, j] (identity experts).
    dispatch_a2a()
    y = combine_full()
    ref = torch.zeros(T, H, dtype=torch.float32, device=device).index_add_(0, src, x.float()[src] * rw[:, None])
    out["check_rel_err"] = float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
    out["dispatch_a2a_ms"] = timed(dispatch_a2a)
    out["dispatch_fp8_a2a_ms"] = timed(dispatch_fp8_a2a)
    out["combine_a2a_ms"] = timed(combine_a2a)
    out["dispatch_full_ms"] = timed(dispatch_full)
    out["combine_full_ms"] = timed(combine_full)
    out["dispatch_tok_a2a_ms"] = timed(dispatch_tok_a2a)
    out["dispatch_fp8_tok_a2a_ms"] = timed(dispatch_tok_fp8_a2a)
    out["combine_tok_a2a_ms"] = timed(combine_tok_a2a)
    align()
    dist.destroy_process_group()
    emit(out)


if __name__ == "__main__":
    main()
