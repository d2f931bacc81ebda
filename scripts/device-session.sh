#!/usr/bin/env bash
# One GPU-machine session, run there from the project root through .device/enter:
#   bash .device/enter bash scripts/device-session.sh [tests] [all] [sass] [train [train-wide]] [interop] [peer] [serve-ep] [multi] [ncu] [bench]
#   (MOE_EP_SKIP_BUILD=1: use a carried build/Release; MOE_EP_BENCH="dispatch moe-layer": only those benchmarks; MOE_EP_BENCH_ARGS=--quick: fewer repeats;
#    MOE_EP_TESTS=path: run only those GPU test files)
# Builds the addon there (proving the build, and checking the NCCL ABI against the real nccl.h),
# prints `moe-ep info`, runs the GPU suite and the whole suite, and the benchmarks when asked.
# Logs and JSON go to $OUT (or ./out). MOE_EP_COMMIT names the commit (there is no .git there).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export MOE_EP_MACHINE=${MOE_EP_MACHINE:-nvidia-h200}
what=${*:-tests}
status=0
step() { echo "=== $1"; }

step "build"
if [[ -n ${MOE_EP_SKIP_BUILD:-} && -e build/Release/moe_ep.node ]]; then
  # The addon came along (built on the dev machine for sm_90, carried as build/Release): saves ~80 s.
  echo "skipped: using the carried build/Release"
elif ! (time MOE_EP_CUDA=on npm run build:native) > "$OUT/build.log" 2>&1; then
  echo "build failed"; tail -40 "$OUT/build.log"; exit 1
else
  grep -E "moe-ep:|NCCL ABI|real" "$OUT/build.log"
fi

step "info"
node dist/lib/cli/main.js info | tee "$OUT/info.txt"

if [[ " $what " == *" tests "* ]]; then
  step "npm run test:gpu"
  # The raw vitest report stays in /tmp: only 8 files come back from the GPU machine.
  # MOE_EP_TESTS narrows the run to some files (vitest ORs path filters, so it replaces test/gpu).
  MOE_EP_REQUIRE_GPU=1 npx vitest run ${MOE_EP_TESTS:-test/gpu} --reporter=default --reporter=json --outputFile.json=/tmp/gpu-tests.json > "$OUT/gpu-tests.log" 2>&1 || status=1
  tail -8 "$OUT/gpu-tests.log"
  MOE_EP_TEST_COMMAND="npm run test:gpu ${MOE_EP_TESTS:-}" node scripts/gpu-test-summary.mjs /tmp/gpu-tests.json "$OUT/gpu-tests-summary.json"
fi

if [[ " $what " == *" all "* ]]; then
  step "whole suite with the GPU present"
  MOE_EP_REQUIRE_GPU=1 npx vitest run --reporter=default --reporter=json --outputFile.json=/tmp/all-tests.json > "$OUT/all-tests.log" 2>&1 || status=1
  tail -8 "$OUT/all-tests.log"
  MOE_EP_TEST_COMMAND="MOE_EP_REQUIRE_GPU=1 npx vitest run" node scripts/gpu-test-summary.mjs /tmp/all-tests.json "$OUT/all-tests-summary.json"
fi

if [[ " $what " == *" sass "* ]]; then
  # Per kernel: tensor-core instructions (HMMA = mma.sync, HGMMA = wgmma) and local-memory traffic
  # (LDL/STL: spills or arrays indexed at run time) in the sm_90 machine code of the addon.
  step "sass"
  cuobjdump --dump-sass --gpu-architecture sm_90 build/Release/moe_ep.node > /tmp/sass.txt 2>&1 || true
  awk '/Function :/ { if (name) printf "%-90s HMMA %5d HGMMA %5d LDL %4d STL %4d\n", name, h, g, l, s; name=$3; h=g=l=s=0 }
       /HMMA/ { h++ } /HGMMA/ { g++ } /LDL/ { l++ } /STL/ { s++ }
       END { if (name) printf "%-90s HMMA %5d HGMMA %5d LDL %4d STL %4d\n", name, h, g, l, s }' /tmp/sass.txt \
    | c++filt | sort > "$OUT/sass-summary.txt"
  grep -E "grouped_gemm|router|permute" "$OUT/sass-summary.txt" | cut -c1-160 | head -40
fi

if [[ " $what " == *" train "* ]]; then
  # The main job on the GPU: the default task, two ranks sharing the GPU (MPI staging), and with
  # train-wide a wider model.
  step "moe-ep train on the GPU"
  node dist/lib/cli/main.js train --device cuda --no-progress --out /tmp/run-default > "$OUT/train.log" 2>&1 || status=1
  tail -4 "$OUT/train.log"
  # Expert-choice routing (docs/expert-choice.md) on the same task.
  node dist/lib/cli/main.js train --device cuda --no-progress --model.routing expert-choice --out /tmp/run-expert-choice >> "$OUT/train.log" 2>&1 || status=1
  tail -4 "$OUT/train.log"
  if [[ " $what " == *" train-wide "* ]]; then
    # A wider model, phases timed: 10 steps with the targets made on the CPU (~1.1 s per step on an
    # H200 at adeaae7), then 50 with them made on the GPU (--data.onDevice true).
    wide="--model.hidden 1024 --model.ffn 512 --model.experts 64 --model.topK 8 --model.groups 8 --model.topkGroups 4 --data.tokensPerStep 8192 --train.profile true"
    node dist/lib/cli/main.js train --device cuda --no-progress --steps 10 --out /tmp/run-wide-cpu-data $wide >> "$OUT/train.log" 2>&1 || status=1
    tail -3 "$OUT/train.log"
    node dist/lib/cli/main.js train --device cuda --no-progress --steps 50 --out /tmp/run-wide $wide --data.onDevice true >> "$OUT/train.log" 2>&1 || status=1
    tail -3 "$OUT/train.log"
  fi
  mpirun -np 2 node dist/lib/cli/main.js train --device cuda --no-progress --steps 300 --out /tmp/run-mpi >> "$OUT/train.log" 2>&1 || status=1
  tail -4 "$OUT/train.log"
fi

if [[ " $what " == *" interop "* ]]; then
  # Checkpoints written here must load in Python's safetensors and torch (the GPU machine has both).
  step "safetensors interop"
  node dist/lib/cli/main.js train --steps 30 --device cuda --no-progress --out /tmp/run-interop > /dev/null 2>&1 || status=1
  python3 test/interop/check_safetensors.py /tmp/run-interop/checkpoints --cuda 2>&1 | tee "$OUT/interop.log" || status=1
fi

# Ranks sharing GPU 0 (the peer and serve-ep steps): mpirun with a bound, and the MPS daemon, which
# lets their cross-process spin-waits progress without time slicing (MOE_EP_PEER_NO_MPS=1: never
# started; mps_stop does nothing then).
mp() { local np=$1; shift; timeout "${MOE_EP_PEER_TIMEOUT:-240}" mpirun --allow-run-as-root --oversubscribe -np "$np" -x CUDA_VISIBLE_DEVICES=0 "$@"; }
mps=0
mps_start() {
  if [[ -z ${MOE_EP_PEER_NO_MPS:-} ]] && command -v nvidia-cuda-mps-control > /dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d && mps=1 && echo "MPS daemon started"
  fi
}
mps_stop() { if (( mps )); then echo quit | nvidia-cuda-mps-control; mps=0; echo "MPS daemon stopped"; fi; }

if [[ " $what " == *" peer "* ]]; then
  # The peer-memory ('ipc') transport with ranks sharing GPU 0 (issue 16): correctness at 2 and 4
  # ranks, the EP layer and training, a frozen rank, then the dispatch benchmark per transport.
  # Cross-process spin-waits on one GPU progress by time slicing (ms per round trip) unless the MPS
  # daemon runs: the correctness scripts run once without it, then everything under it; the
  # daemon is stopped before the step ends (MOE_EP_PEER_NO_MPS=1: never started).
  step "peer-memory transport, ranks sharing GPU 0"
  run_peer() {
    local tag=$1
    for np in 2 4; do
      echo "--- [$tag] peer.mjs, $np ranks"
      mp "$np" node test/mpi/peer.mjs --device cuda > "/tmp/peer-$tag-$np.log" 2>&1 && echo ok || { status=1; tail -25 "/tmp/peer-$tag-$np.log"; }
      cat "/tmp/peer-$tag-$np.log" >> "$OUT/peer.log"
    done
  }
  run_peer time-sliced
  mps_start
  (( mps )) && run_peer mps
  for extra in "" "--capacity"; do
    echo "--- peer-fault.mjs $extra (rank 1 frozen; 3 s timeout)"
    mp 2 node test/mpi/peer-fault.mjs --device cuda $extra 2>&1 | grep -E "^rank" | tee -a "$OUT/peer.log"
  done
  layer_runs=("4 moe-layer.mjs" "2 moe-layer.mjs")
  [[ -z ${MOE_EP_PEER_NO_TRAIN:-} ]] && layer_runs+=("2 train.mjs")
  for script in "${layer_runs[@]}"; do
    set -- $script
    echo "--- mpirun -np $1 $2 --device cuda (auto: ipc)"
    mp "$1" node "test/mpi/$2" --device cuda > "/tmp/peer-$1-$2.log" 2>&1 && echo ok || { status=1; tail -20 "/tmp/peer-$1-$2.log"; }
    cat "/tmp/peer-$1-$2.log" >> "$OUT/peer.log"
  done
  if [[ -z ${MOE_EP_PEER_NO_BENCH:-} ]]; then
    echo "--- dispatch benchmark: 1 rank, then 2 ranks sharing GPU 0 (ipc and nccl=MPI staging), 4 ranks (ipc)"
    timeout 300 node benchmarks/dispatch.bench.mjs --out "$OUT" ${MOE_EP_BENCH_ARGS:-} 2>&1 | tail -8 | tee -a "$OUT/peer.log" || status=1
    mp 2 node benchmarks/dispatch.bench.mjs --out "$OUT" ${MOE_EP_BENCH_ARGS:-} 2>&1 | tail -16 | tee -a "$OUT/peer.log" || status=1
    mp 4 node benchmarks/dispatch.bench.mjs --out "$OUT" --transport ipc --no-peer ${MOE_EP_BENCH_ARGS:-} 2>&1 | tail -16 | tee -a "$OUT/peer.log" || status=1
  fi
  mps_stop
fi

if [[ " $what " == *" serve-ep "* ]]; then
  # MoEInference across ranks sharing GPU 0 (issue 19): the low-latency path and its CUDA graphs at 2
  # and 4 ranks (time-sliced, then under MPS), a rank killed after capture, then serve.bench.mjs
  # --ranks 2 and 4 (under MPS when it started). MOE_EP_PEER_NO_MPS=1: no MPS daemon.
  step "serving across ranks sharing GPU 0"
  run_serve_ep() {
    for np in 2 4; do
      echo "--- [$1] serve-ep.mjs, $np ranks"
      mp "$np" node test/mpi/serve-ep.mjs --device cuda > "/tmp/serve-ep-$1-$np.log" 2>&1 && echo ok || { status=1; tail -25 "/tmp/serve-ep-$1-$np.log"; }
      cat "/tmp/serve-ep-$1-$np.log" >> "$OUT/serve-ep.log"
    done
  }
  run_serve_ep time-sliced
  echo "--- serve-ep.mjs --kill (rank 1 killed after capture; 3 s timeout)"
  OMPI_MCA_orte_enable_recovery=1 mp 2 -x OMPI_MCA_orte_enable_recovery node test/mpi/serve-ep.mjs --device cuda --kill 2>&1 | grep -E "^rank .* after" | tee -a "$OUT/serve-ep.log"
  mps_start
  (( mps )) && run_serve_ep mps
  for np in 2 4; do
    echo "--- serve.bench.mjs --ranks $np (ranks share GPU 0)"
    mp "$np" node benchmarks/serve.bench.mjs --ranks "$np" --out "$OUT" ${MOE_EP_BENCH_ARGS:-} 2>&1 | tail -12 | tee -a "$OUT/serve-ep.log" || status=1
  done
  mps_stop
fi

if [[ " $what " == *" multi "* ]]; then
  # Several GPUs (issue #8): one rank per GPU, so init() picks NCCL. The test/mpi scripts check their
  # results on every rank (EP=N layer and training against EP=1, mismatched calls caught by NCCL's
  # header all-gather on every rank (issue 14), checkpoints across EP sizes); the
  # dispatch benchmark runs DeepEP's configuration beside torch's all_to_all_single.
  gpus=$(nvidia-smi -L | wc -l)
  step "multi-GPU: $gpus GPUs"
  for np in 2 4 8; do
    (( np <= gpus )) || continue
    for script in moe-layer.mjs train.mjs mismatch.mjs; do
      echo "--- mpirun -np $np $script --device cuda"
      timeout 300 mpirun --allow-run-as-root -np "$np" node "test/mpi/$script" --device cuda > "/tmp/multi-$np-$script.log" 2>&1 \
        && echo "ok" || { status=1; tail -20 "/tmp/multi-$np-$script.log"; }
      cat "/tmp/multi-$np-$script.log" >> "$OUT/multi.log"
    done
    # A checkpoint saved at EP = np, loaded at EP = np/2 and at EP = 1: the same outputs.
    ck=/tmp/ckpt-multi-$np
    rm -rf "$ck" && mkdir -p "$ck"
    echo "--- checkpoint saved at EP=$np, loaded at EP=$((np / 2)) and EP=1 (--device cuda)"
    { timeout 300 mpirun --allow-run-as-root -np "$np" node test/mpi/checkpoint.mjs save "$ck" --device cuda \
      && timeout 300 mpirun --allow-run-as-root -np $((np / 2)) node test/mpi/checkpoint.mjs load "$ck" "$ck/y.bin" --device cuda \
      && timeout 120 node test/mpi/checkpoint.mjs load "$ck" "$ck/y.bin" --device cuda; } > "/tmp/multi-$np-ckpt.log" 2>&1 \
      && echo "ok" || { status=1; tail -20 "/tmp/multi-$np-ckpt.log"; }
    cat "/tmp/multi-$np-ckpt.log" >> "$OUT/multi.log"
  done
  if (( gpus >= 2 )); then
    timeout 300 mpirun --allow-run-as-root -np "$gpus" node benchmarks/dispatch.bench.mjs --out "$OUT" 2>&1 | tee -a "$OUT/multi.log" | tail -40 || status=1
    # The same without a timeout: NCCL collectives are then queued with no host wait after each,
    # which prices that wait (the timeline in the JSON shows where the rest goes).
    timeout 300 mpirun --allow-run-as-root -np "$gpus" node benchmarks/dispatch.bench.mjs --out "$OUT" --no-peer --timeout-ms 0 2>&1 | tee -a "$OUT/multi.log" | tail -30 || status=1
    # Weak scaling: one layer step at EP = every GPU against the same per-rank work at EP = 1.
    timeout 300 mpirun --allow-run-as-root -np "$gpus" node benchmarks/ep-step.bench.mjs --out "$OUT" 2>&1 | tee -a "$OUT/multi.log" | tail -12 || status=1
    timeout 300 mpirun --allow-run-as-root -np "$gpus" node benchmarks/ep-step.bench.mjs --out "$OUT" --timeout-ms 0 2>&1 | tee -a "$OUT/multi.log" | tail -8 || status=1
    # A rank killed mid-collective, without mpirun (which would kill the job itself): the survivor's
    # NCCL wait must end in a TimeoutError naming the op and rank 1 within the 3 s timeout + slack.
    echo "--- kill rank 1 (2 processes, TCP rendezvous, NCCL)"
    for r in 0 1; do
      RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 \
        timeout 60 node test/mpi/kill.mjs --device cuda > "/tmp/kill-$r.log" 2>&1 &
    done
    wait
    cat /tmp/kill-0.log | tee -a "$OUT/multi.log"
    # "rank 0 after <ms> ms: TimeoutError: allToAllV ...", within the 3 s timeout plus 5 s of slack.
    ms=$(sed -nE 's/^rank 0 after ([0-9]+) ms: TimeoutError: allToAllV.*/\1/p' /tmp/kill-0.log)
    [[ -n $ms ]] && (( ms < 8000 )) || { echo "kill: no TimeoutError from allToAllV within 8 s on rank 0"; status=1; }
  fi
fi

if [[ " $what " == *" ncu "* ]]; then
  # Nsight Compute on the grouped GEMM (issue #7's evidence): every product of the benchmark's shapes,
  # launched twice each (warm-up, then again), speed of light, pipes, memory and warp stalls, as CSV.
  # --clock-control none: the GPU's clocks stay as they are (they are never to be changed here).
  step "ncu: grouped GEMM"
  ncu_bin=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [[ -z $ncu_bin ]]; then
    echo "no ncu on this machine"
  else
    timeout "${MOE_EP_NCU_TIMEOUT:-240}" "$ncu_bin" --clock-control none --kernel-name regex:grouped_gemm \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \
      --csv --page details node benchmarks/grouped-gemm-profile.mjs > "$OUT/ncu-grouped-gemm.csv" 2> "$OUT/ncu.err" || status=1
    tail -5 "$OUT/ncu.err"
    grep -c '"' "$OUT/ncu-grouped-gemm.csv" || true
  fi
fi

if [[ " $what " == *" bench "* ]]; then
  # MOE_EP_BENCH_ARGS goes to every benchmark (e.g. --quick). Each has 10 minutes at most. The
  # dispatch benchmark also runs as 2 ranks sharing GPU 0 (MPI backend, host staging), --quick:
  # its result is a separate file (dispatch-2ranks-mpi-<commit>.json).
  step "benchmarks"
  for b in benchmarks/*.bench.mjs; do
    [[ -e $b ]] || continue
    if [[ -n ${MOE_EP_BENCH:-} ]]; then
      keep=0
      for name in $MOE_EP_BENCH; do [[ $b == *"$name"* ]] && keep=1; done
      (( keep )) || continue
    fi
    echo "--- $b ${MOE_EP_BENCH_ARGS:-}"
    timeout 600 node "$b" --out "$OUT" ${MOE_EP_BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log" || status=1
    if [[ $b == *dispatch.bench.mjs ]]; then
      echo "--- mpirun -np 2 (sharing GPU 0) $b --quick"
      timeout 400 mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 \
        node "$b" --out "$OUT" --quick 2>&1 | tee -a "$OUT/bench.log" || status=1
    fi
  done
fi
exit $status
