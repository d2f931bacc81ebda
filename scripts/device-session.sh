#!/usr/bin/env bash
# One GPU-machine session, run there from the project root through .device/enter:
#   bash .device/enter bash scripts/device-session.sh [tests] [suite] [all] [sass] [train [train-wide]] [interop] [peer] [serve-ep] [multi] [multi-rest] [ncu] [ladder] [power] [bench]
#   (MOE_EP_SKIP_BUILD=1: use a carried build/Release; MOE_EP_BENCH="dispatch moe-layer": only those benchmarks; MOE_EP_BENCH_ARGS=--quick: fewer repeats;
#    MOE_EP_TESTS=path: run only those GPU test files; MOE_EP_LADDER, MOE_EP_LADDER_ARGS, MOE_EP_LADDER_NCU: the ladder step; MOE_EP_SMI=1: clock and power samples)
# Builds the addon there (proving the build, and checking the NCCL ABI against the real nccl.h),
# prints `moe-ep info`, runs the GPU suite and the whole suite, and the benchmarks when asked.
# Logs and JSON go to $OUT (or ./out). MOE_EP_COMMIT names the commit in the result files; unset, it
# is the copy's git HEAD when it has one (with -dirty when tracked files differ from it), else unknown.
# Set it when calling through the device tool: its copy may carry a .git from earlier (session 22 got 3af50cf-dirty for cdda9e3).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
if [[ -z ${MOE_EP_COMMIT:-} ]] && MOE_EP_COMMIT=$(git rev-parse --short HEAD 2> /dev/null); then
  [[ -z $(git status --porcelain --untracked-files=no 2> /dev/null) ]] || MOE_EP_COMMIT+=-dirty
fi
export MOE_EP_COMMIT=${MOE_EP_COMMIT:-unknown}
export MOE_EP_MACHINE=${MOE_EP_MACHINE:-nvidia-h200}
what=${*:-tests}
status=0
step() { echo "=== $1"; }
# Nsight Compute (the ncu and ladder steps): on PATH or where CUDA and Nsight install it; empty if none.
find_ncu() { command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1; }

# MOE_EP_SMI=1: nvidia-smi samples every GPU's SM clock and power draw every 20 ms through the whole
# session into smi.csv.gz, one line per GPU with its index (the GEMMs run at the clock the power
# limit allows: issue 20). The ladder's --soak-ms windows and power_roof.py's cases line up with it
# by their wall-clock times. timeout bounds the sampler if the script dies without its EXIT trap.
smi_pid=
if [[ ${MOE_EP_SMI:-0} != 0 ]]; then
  smi_fields=timestamp,index,clocks.sm,clocks.mem,power.draw.instant,power.limit,temperature.gpu,clocks_event_reasons.active
  # Older drivers lack some fields (nvidia-smi then refuses the whole query): fall back to fewer.
  nvidia-smi --query-gpu=$smi_fields --format=csv -c 1 > /dev/null 2>&1 || smi_fields=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu
  timeout 3600 nvidia-smi --query-gpu=$smi_fields --format=csv,nounits -lms 20 > "$OUT/smi.csv" 2> /dev/null &
  smi_pid=$!
fi
stop_smi() { if [[ -n $smi_pid ]]; then kill "$smi_pid" 2> /dev/null; wait "$smi_pid" 2> /dev/null; gzip -f "$OUT/smi.csv"; smi_pid=; fi; }
trap stop_smi EXIT
trap 'exit 143' TERM INT HUP  # a signal ends the script through its EXIT trap (bash skips it otherwise)

# The ladder's programs and the power step's Python need no addon: with only those, neither the
# build nor the info step runs.
needs_addon=0
for w in $what; do [[ $w == ladder || $w == power ]] || needs_addon=1; done

step "build"
if ((!needs_addon)); then
  echo "skipped: the ladder's programs and the power step need no addon"
elif [[ -n ${MOE_EP_SKIP_BUILD:-} && -e build/Release/moe_ep.node ]]; then
  # The addon came along (built on the dev machine for sm_90, carried as build/Release): saves ~80 s.
  echo "skipped: using the carried build/Release"
elif ! (time MOE_EP_CUDA=on npm run build:native) > "$OUT/build.log" 2>&1; then
  echo "build failed"; tail -40 "$OUT/build.log"; exit 1
else
  grep -E "moe-ep:|NCCL ABI|real" "$OUT/build.log"
fi

step "info"
# With a multi step the information goes into multi.log instead: only 8 files come back from a call.
info_file=$OUT/info.txt
[[ " $what " == *" multi "* || " $what " == *" multi-rest "* ]] && info_file=$OUT/multi.log
((!needs_addon)) || node dist/lib/cli/main.js info | tee -a "$info_file"

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

if [[ " $what " == *" suite "* ]]; then
  # The whole GPU suite as three vitest runs, one summary each, named for the commit and the group
  # (benchmarks/results/gpu-tests-<commit>-<group>.json): the ranks of 23 and 62 share GPU 0 and run
  # under the MPS daemon; the grouped-GEMM and permute files (11, 12, 13, 17: most of the time) alone;
  # every other file together. MOE_EP_SUITE_GROUPS picks some of "mps rest gemm" (default: all three; rest1 and rest2 split rest).
  # With a build, all three may not fit one 10-minute call: run "mps rest" first, then "gemm" with
  # MOE_EP_SKIP_BUILD=1 on the still-warm machine (as for gpu-tests-b215a4b-*.json).
  step "GPU suite in three groups"
  gemm_files="test/gpu/11-capacity-permute test/gpu/12-grouped-gemm test/gpu/13-grouped-gemm-decode test/gpu/17-router-gemm"
  mps_files="test/gpu/23-peer-transport test/gpu/62-serve-ep"
  rest_files=$(ls test/gpu/*.gpu.test.ts | sed 's/\.gpu\.test\.ts$//' | grep -vE '/(11|12|13|17|23|62)-' | tr '\n' ' ')
  suite_group() {
    local name=$1 prefix=$2 json=/tmp/gpu-tests-$1.json
    shift 2
    echo "--- $name: $*" >> "$OUT/suite.log"
    MOE_EP_REQUIRE_GPU=1 npx vitest run "$@" --reporter=default --reporter=json --outputFile.json="$json" >> "$OUT/suite.log" 2>&1 || status=1
    MOE_EP_TEST_COMMAND="${prefix}MOE_EP_REQUIRE_GPU=1 npx vitest run $*" node scripts/gpu-test-summary.mjs "$json" \
      "$OUT/gpu-tests-${MOE_EP_COMMIT:-unknown}-$name.json" | tail -3
  }
  for group in ${MOE_EP_SUITE_GROUPS:-mps rest gemm}; do
    case $group in
      mps) mps_start; suite_group 23-62-mps "MPS daemon on; " $mps_files; mps_stop ;;
      rest) suite_group all-but-11-12-13-17-23-62 "" $rest_files ;;
      # rest's two halves, for a machine where rest does not fit one 10-minute call (an H100 took
      # over 600 s for it with a build before it): named for their files' numbers.
      rest1 | rest2)
        half_files=$(for f in $rest_files; do n=$(basename "$f" | cut -d- -f1); { [[ $group == rest1 ]] && ((10#$n < 20)); } || { [[ $group == rest2 ]] && ((10#$n >= 20)); } && echo "$f"; done)
        suite_group "$(for f in $half_files; do basename "$f" | cut -d- -f1; done | uniq | paste -sd-)" "" $half_files ;;
      gemm) suite_group 11-12-13-17 "" $gemm_files ;;
      *) echo "suite: unknown group $group (mps, rest, gemm)"; status=1 ;;
    esac
  done
fi

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

# ------------------------------------------------------------------------------------------------
# multi, multi-rest: several GPUs, one rank per GPU (issue #18; not yet run on a machine of 4 or 8
# GPUs, nor in this form on 2). Two calls of at most 10 minutes on nvidia-h200-x2, -x4 or -x8:
#   call 1: bash .device/enter bash scripts/device-session.sh multi
#   call 2: MOE_EP_SKIP_BUILD=1 bash .device/enter bash scripts/device-session.sh multi-rest
#           (MOE_EP_SKIP_BUILD skips the build only where build/Release/moe_ep.node exists: on the
#           machine call 1 left, if still warm (30 s after a call); a fresh one builds, 50-80 s.
#           Never carry this machine's CPU-only build/ there.)
#   on 2 GPUs both fit one call: bash .device/enter bash scripts/device-session.sh multi multi-rest
# Every task runs under `timeout` and under a deadline for the whole call (MOE_EP_DEADLINE_S,
# default 550 s from the script's start, the build included; .device/enter unpacks before that): a
# task that no longer fits is skipped and named so, a hang costs one task's bound, and the call
# still returns its files.
# Both transports each time: 'ipc' (peer memory over NVLink: the dispatcher's choice with a GPU per
# rank) and 'nccl' (NCCL's all-to-all), picked with --transport.
#   multi, in order of importance:
#     1. correctness at EP=2, ipc then nccl: test/mpi/moe-layer.mjs (dispatch/combine identity, bf16
#        and fp8; the layer at EP=2 against EP=1 forward and backward, with and without a comm
#        stream; expert choice), train.mjs (8 steps against EP=1, resumed at EP=1, EDP, expert
#        choice), checkpoint.mjs (saved at EP=2, loaded at EP=1); mismatch.mjs (NCCL's call check).
#        The last 2-GPU run failed in moe-layer and train (host tensors refused by NCCL; fixed in
#        be7f67e, not rerun): these must pass.
#     2. dispatch.bench.mjs at EP=N (N = every GPU): DeepEP's configuration, BF16 and FP8 dispatch,
#        BF16 combine, ipc and nccl, GB/s in DeepEP's accounting, wire MB, torch all_to_all_single
#        on the same split sizes in the same rounds -> dispatch-<N>ranks-nccl-<commit>.json
#     3. ep-step.bench.mjs --overlap at EP=N: the layer step against the same per-rank work at EP=1,
#        compute and exchange, ipc and nccl, with and without a comm stream, 3 interleaved rounds
#        -> ep-step-<N>ranks-nccl-<commit>.json; then the same with --shared-ffn 2048 (a DeepSeek-V3
#        shared expert for the comm stream to hide the exchanges behind: #18's overlap goal)
#        -> ep-step-<N>ranks-nccl-shared2048-<commit>.json
#     4. a rank killed (SIGKILL) mid-step, 2 processes started without mpirun (RANK/WORLD_SIZE):
#        nccl (kill.mjs: raw allToAllV) and ipc (peer-fault.mjs --stop kill, dropless and capacity);
#        every survivor must print a TimeoutError within 8 s (3 s timeout + slack).
#   multi-rest:
#     5. correctness at EP=N as in 1 (checkpoint saved at N, loaded at N/2 and 1); mismatch at N
#     6. dispatch.bench.mjs at EP=2 when N > 2 (issue #18's EP=2 goal) -> dispatch-2ranks-nccl-<commit>.json
#     7. serve.bench.mjs --ranks N --experts 256: MoEInference's low-latency path across the GPUs,
#        eager and graph-replayed decode steps, its dispatch and combine alone (issue #19, beside
#        DeepEP's low-latency figures) -> serve-<N>ranks-<N>gpus-E256-<commit>.json
#     8. the kills of 4 at N ranks when N > 2
#     9. correctness at EP=4 when N = 8
#    10. dispatch.bench.mjs --no-peer --timeout-ms 0 (no host wait after each NCCL collective: what
#        that wait costs) -> dispatch-<N>ranks-nccl-no-timeout-<commit>.json
# Files in $OUT (8 come back from a call): build.log, multi.log (moe-ep info, every task's output,
# a status line per task), multi-summary.json (per task: status ok|failed|timeout|skipped, seconds,
# command), and the result JSON named above: 6 files for multi, at most 6 for multi-rest, 8 for
# both in one call (so no MOE_EP_SMI=1 there: its file would be the ninth and not come back).
# Carry [".device", "dist"] (git-ignored; every bench imports ../dist), never build/ (this machine's
# is CPU-only): `npm run build` and ../shared/device/pack first.
# A transport that fails inside a bench (on any rank) is dropped on every rank and recorded in the
# result file ('errors', each rank's message); the others go on, the file is written and the task
# shows failed (exit 1). The benches' collectives time out after 60 s; after a timeout rank 0
# writes its own rows.
# Time: estimates from what the scripts do, NOT yet measured (multi-summary.json will say); the
# bounds are the timeouts. Build 50-80 s (none with MOE_EP_SKIP_BUILD). Correctness at one EP size,
# both transports: moe-layer 10-20 s, train 15-30 s, checkpoint 5-10 s, each twice, mismatch ~5 s:
# 65-125 s at EP=2, 80-180 s at EP=4 or 8 (bounds 150/180/120 s per script, 60 s mismatch).
# dispatch with the torch peer (3 rounds, the peer restarted each round): 45-70 s at EP=2, 60-100 s
# at EP=8 (bound 300 s). ep-step (3 rounds): 30-60 s each, two of them (bound 180). Kills: 25-45 s
# (bound 75 s each). serve --ranks N: 30-60 s (its own watchdog: 170 s). dispatch without the
# peer: 15-30 s.
#   multi:      x2 235-410 s, x4 and x8 245-440 s (build included)
#   multi-rest: x2 45-90 s (steps 7 and 10; 280-500 s as one call with multi: the deadline may skip
#               step 10 there), x4 240-415 s, x8 290-515 s with a carried build
if [[ " $what " == *" multi "* || " $what " == *" multi-rest "* ]]; then
  gpus=$(nvidia-smi -L | wc -l)
  step "multi-GPU: $gpus GPUs"
  # NVLink multicast stays off on these shared hosts (.device/enter sets them too; kept here for runs without it).
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  [[ $MOE_EP_MACHINE == nvidia-h200 ]] && export MOE_EP_MACHINE=nvidia-h200-x$gpus
  log=$OUT/multi.log
  summary=/tmp/multi-summary.tsv
  : > "$summary"
  deadline=${MOE_EP_DEADLINE_S:-550}
  # mpirun binds ranks to cores by default (to one core each at -np 2): node's threads, NCCL's proxy
  # and the torch peer it starts would share it.
  mpi() { mpirun --allow-run-as-root --bind-to none -np "$@"; }
  # Ranks started without mpirun (RANK/WORLD_SIZE, one GPU each, NCCL over a TCP rendezvous): a
  # killed rank does not take the others down. envrun NP PORT command...; each bounded to 60 s.
  envrun() {
    local np=$1 port=$2 r
    shift 2
    for ((r = 0; r < np; r++)); do
      RANK=$r WORLD_SIZE=$np LOCAL_RANK=$r LOCAL_WORLD_SIZE=$np MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        timeout -k 5 60 "$@" > "/tmp/envrun-$port-$r.log" 2>&1 &
    done
    wait
    for ((r = 0; r < np; r++)); do cat "/tmp/envrun-$port-$r.log"; done
  }
  export -f mpi envrun
  # task NAME BOUND_S MIN_S COMMAND [CHECK...]: runs COMMAND (a bash command line) under timeout
  # min(BOUND_S, time left before the deadline), its output appended to multi.log; skipped when
  # less than MIN_S is left. CHECK (optional): a check_* function and its arguments, called with the
  # task's output file last, that must succeed too.
  task() {
    local name=$1 bound=$2 min=$3 cmd=$4 left=$((deadline - SECONDS)) t0=$SECONDS rc st out=/tmp/task-$1.log
    shift 4
    if ((left < min)); then
      echo "--- $name: skipped ($left s left before the deadline, needs ~$min)" | tee -a "$log"
      printf '%s\tskipped\t0\t%s\n' "$name" "$cmd" >> "$summary"
      status=1
      return
    fi
    ((bound > left - 5)) && bound=$((left - 5))
    echo "--- $name (bound ${bound} s): $cmd" >> "$log"
    # Straight into multi.log too, so that what a task printed comes back even if the call is cut short.
    timeout -k 10 "$bound" bash -c "$cmd" 2>&1 | tee "$out" >> "$log"
    rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then st=timeout
    elif ((rc != 0)); then st=failed
    elif (($# > 0)) && ! "$@" "$out" >> "$log" 2>&1; then st=failed
    else st=ok; fi
    [[ $st == ok ]] || status=1
    echo "--- $name: $st (rc $rc) in $((SECONDS - t0)) s" | tee -a "$log"
    [[ $st == ok ]] || tail -15 "$out"
    printf '%s\t%s\t%s\t%s\n' "$name" "$st" "$((SECONDS - t0))" "$cmd" >> "$summary"
  }
  # Every rank printed "ok rank R of NP (transport TR)": the rows went the way asked.
  check_transport() {
    local np=$1 tr=$2 n
    n=$(grep -cE "^ok rank [0-9]+ of $np \\(transport $tr\\)\$" "$3")
    ((n == np)) || { echo "check: $n of $np ranks printed 'ok rank R of $np (transport $tr)'"; return 1; }
  }
  # Every rank printed "ok rank R of NP" (with anything after).
  check_ok() {
    local np=$1 n
    n=$(grep -cE "^ok rank [0-9]+ of $np( |\$)" "$2")
    ((n == np)) || { echo "check: $n of $np ranks printed 'ok rank R of $np'"; return 1; }
  }
  # Every survivor of a kill (NP - 1 ranks) ended in a TimeoutError within 8 s (the 3 s timeout + slack).
  check_kills() {
    local np=$1 n
    n=$(sed -nE 's/^rank [0-9]+ after ([0-9]+) ms: TimeoutError.*/\1/p' "$2" | awk '$1 < 8000' | wc -l)
    ((n == np - 1)) || { echo "check: $n of $((np - 1)) survivors ended in a TimeoutError within 8 s"; return 1; }
  }
  # Correctness at EP = np through transport tr (ipc or nccl).
  correctness() {
    local np=$1 tr=$2 ck=/tmp/ckpt-multi-$1-$2 load
    task "ep$np-$tr-moe-layer" 150 20 "mpi $np node test/mpi/moe-layer.mjs --device cuda --transport $tr" check_transport "$np" "$tr"
    task "ep$np-$tr-train" 180 25 "mpi $np node test/mpi/train.mjs --device cuda --transport $tr" check_transport "$np" "$tr"
    # A checkpoint saved at EP = np, loaded at EP = np/2 (when above 1) and at EP = 1: the same outputs.
    load="node test/mpi/checkpoint.mjs load $ck $ck/y.bin --device cuda"
    ((np > 2)) && load="mpi $((np / 2)) node test/mpi/checkpoint.mjs load $ck $ck/y.bin --device cuda --transport $tr && $load"
    task "ep$np-$tr-checkpoint" 120 15 "rm -rf $ck && mkdir -p $ck && mpi $np node test/mpi/checkpoint.mjs save $ck --device cuda --transport $tr && $load"
  }
  correctness_all() {
    (($1 <= gpus)) || return 0
    correctness "$1" ipc
    correctness "$1" nccl
    task "ep$1-mismatch" 60 10 "mpi $1 node test/mpi/mismatch.mjs --device cuda" check_ok "$1"
  }
  # Kills at np ranks, rendezvous ports from `port` on: NCCL, then ipc dropless and in capacity mode.
  kill_tests() {
    local np=$1 port=$2
    ((np <= gpus)) || return 0
    task "kill-$np-nccl" 75 15 "envrun $np $port node test/mpi/kill.mjs --device cuda" check_kills "$np"
    task "kill-$np-ipc" 75 15 "envrun $np $((port + 1)) node test/mpi/peer-fault.mjs --device cuda --stop kill" check_kills "$np"
    task "kill-$np-ipc-capacity" 75 15 "envrun $np $((port + 2)) node test/mpi/peer-fault.mjs --device cuda --stop kill --capacity" check_kills "$np"
  }
  {
    echo "# $MOE_EP_MACHINE ($gpus GPUs), commit ${MOE_EP_COMMIT:-unknown}: scripts/device-session.sh $what"
    nvidia-smi topo -m 2>&1 | head -12
  } >> "$log"
  if ((gpus < 2)); then
    echo "multi: $gpus GPU(s); needs 2 or more" | tee -a "$log"
    status=1
  fi
  if ((gpus >= 2)) && [[ " $what " == *" multi "* ]]; then
    correctness_all 2
    task "dispatch-ep$gpus" 300 60 "mpi $gpus node benchmarks/dispatch.bench.mjs --out $OUT"
    task "ep-step-ep$gpus" 180 30 "mpi $gpus node benchmarks/ep-step.bench.mjs --overlap --out $OUT"
    task "ep-step-ep$gpus-shared" 180 30 "mpi $gpus node benchmarks/ep-step.bench.mjs --overlap --shared-ffn 2048 --out $OUT"
    kill_tests 2 29517
  fi
  if ((gpus >= 2)) && [[ " $what " == *" multi-rest "* ]]; then
    ((gpus > 2)) && correctness_all "$gpus"
    ((gpus > 2)) && task "dispatch-ep2" 240 60 "mpi 2 node benchmarks/dispatch.bench.mjs --out $OUT"
    experts=256
    ((256 % gpus == 0)) || experts=$((8 * gpus))
    task "serve-ep$gpus" 180 30 "mpi $gpus node benchmarks/serve.bench.mjs --ranks $gpus --experts $experts --out $OUT"
    ((gpus > 2)) && kill_tests "$gpus" 29527
    ((gpus == 8)) && correctness_all 4
    task "dispatch-ep$gpus-no-timeout" 180 40 "mpi $gpus node benchmarks/dispatch.bench.mjs --out $OUT --no-peer --timeout-ms 0"
  fi
  # multi-summary.json: one entry per task, in the order run.
  node -e '
    const fs = require("fs");
    const rows = fs.readFileSync(process.argv[1], "utf8").split("\n").filter(Boolean).map((l) => {
      const [task, status, seconds, ...cmd] = l.split("\t");
      return { task, status, seconds: Number(seconds), command: cmd.join("\t") };
    });
    const out = { machine: process.env.MOE_EP_MACHINE, gpus: Number(process.argv[3]), commit: process.env.MOE_EP_COMMIT ?? null,
      steps: process.argv[4], deadlineS: Number(process.argv[5]), totalS: Number(process.argv[6]), tasks: rows };
    fs.writeFileSync(process.argv[2], JSON.stringify(out, null, 2) + "\n");
    for (const r of rows) console.log(`${r.status.padEnd(8)} ${String(r.seconds).padStart(4)} s  ${r.task}`);
  ' "$summary" "$OUT/multi-summary.json" "$gpus" "$what" "$deadline" "$SECONDS" | tee -a "$log"
fi

if [[ " $what " == *" ncu "* ]]; then
  # Nsight Compute on the grouped GEMM (issue #7's evidence): every product of the benchmark's shapes,
  # launched twice each (warm-up, then again), speed of light, pipes, memory and warp stalls, as CSV.
  # --clock-control none: the GPU's clocks stay as they are (they are never to be changed here).
  step "ncu: grouped GEMM"
  ncu_bin=$(find_ncu)
  if [[ -z $ncu_bin ]]; then
    echo "no ncu on this machine"
  else
    # The kernels of a product: grouped_gemm* (hopper.cu, cuda.cu) and the B-resident dW's dw_b_resident*.
    timeout "${MOE_EP_NCU_TIMEOUT:-240}" "$ncu_bin" --clock-control none --kernel-name 'regex:grouped_gemm|dw_b_resident' \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \
      --csv --page details node benchmarks/grouped-gemm-profile.mjs > "$OUT/ncu-grouped-gemm.csv" 2> "$OUT/ncu.err" || status=1
    tail -5 "$OUT/ncu.err"
    grep -c '"' "$OUT/ncu-grouped-gemm.csv" || true
  fi
fi

if [[ " $what " == *" ladder "* ]]; then
  # The grouped-GEMM ladder's standalone programs (benchmarks/kernels/grouped_gemm/README.md; no addon
  # needed). MOE_EP_LADDER: the steps to run (default "10 11") with MOE_EP_LADDER_ARGS (default: 5
  # rounds on the step's own shape; steps 10 and 12 on the layer's dW13; several runs separated by
  # ';', the ragged checks first with each run's --only); each step's output goes to ladder<step>.txt. MOE_EP_LADDER_NCU=1 adds
  # Nsight Compute on the step's first MOE_EP_LADDER_NCU_LAUNCHES launches (default 5: step 10's case 0
  # and its four variants in the checked run; step 11's two kernels, then its timing's first launches):
  # the full section set as CSV, and the per-instruction source page (SASS with warp-stall samples)
  # gzipped, to see where each kernel's warps wait (issue 20: ladder 10b's per-stage protocol).
  # Files: ladder<step>.txt (the small checks, the timed run, ncu's log), ncu-ladder<step>.csv and
  # ncu-ladder<step>-source.csv.gz: 6 for steps 10 and 11, so run it as a call of its own.
  step "ladder"
  ladder_dir=benchmarks/kernels/grouped_gemm
  nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  ncu_bin=$(find_ncu)
  for n in ${MOE_EP_LADDER:-10 11}; do
    # Small ragged problems first (partial tiles, empty and sub-k-step groups; a second or two): a
    # step that fails them is not timed. Then the step's own shape (10: the layer's dW13).
    case $n in
      10) default_args="--E 32 --M 32768 --K 7168 --N 4096 --rounds 5"
          checks=("--E 3 --M 600 --K 200 --N 328 --ragged 1") ;;
      12) default_args="--E 32 --M 32768 --K 7168 --N 4096 --rounds 5"
          checks=("--E 3 --M 600 --K 200 --N 328 --ragged 1" "--E 5 --M 700 --K 136 --N 264 --ragged 1") ;;
      11) default_args="--rounds 5"
          checks=("--E 5 --M 500 --K 200 --N 328 --ragged 1" "--E 7 --M 500 --K 136 --N 264 --ragged 1") ;;
      # 13: the layer's up projection (its default shape); K = 200 leaves a partial last k-tile.
      13) default_args="--rounds 5"
          checks=("--E 3 --M 600 --K 200 --N 328 --ragged 1" "--E 5 --M 700 --K 136 --N 264 --ragged 1") ;;
      *) default_args="--rounds 5"; checks=() ;;
    esac
    # MOE_EP_LADDER_ARGS: one timed run, or several separated by ';' (e.g. "… --only 5; … --only 14").
    # The checks run with each run's --only, so that every variant timed was checked first.
    IFS=';' read -ra runs <<< "${MOE_EP_LADDER_ARGS:-$default_args}"
    mapfile -t onlys < <(for r in "${runs[@]}"; do grep -oE -- '--only [0-9]+' <<< "$r" || true; done | sort -u)
    ((${#onlys[@]})) || onlys=("")
    src=$(cd "$ladder_dir" && ls "$n"-*.cu 2>/dev/null | head -1)
    if [[ -z $src ]]; then echo "no ladder step $n"; status=1; continue; fi
    prog=${src%.cu}
    # The build log stays in /tmp (only 8 files come back from a call); its tail is shown on failure.
    if ! make -s -C "$ladder_dir" NVCC="$nvcc_bin" "$prog" > "/tmp/ladder$n-build.log" 2>&1; then
      echo "ladder $n: build failed"; tail -20 "/tmp/ladder$n-build.log"; status=1; continue
    fi
    : > "$OUT/ladder$n.txt"
    ok=1
    for c in "${checks[@]}"; do
      for o in "${onlys[@]}"; do
        echo "--- $prog $c $o --rounds 1 --repeats 1" | tee -a "$OUT/ladder$n.txt"
        # shellcheck disable=SC2086 # the arguments are meant to split
        timeout 60 "./$ladder_dir/$prog" $c $o --rounds 1 --repeats 1 >> "$OUT/ladder$n.txt" 2>&1 || { ok=0; break 2; }
      done
    done
    if ((!ok)); then tail -5 "$OUT/ladder$n.txt"; echo "ladder $n: a small check failed; not timed"; status=1; continue; fi
    for ladder_args in "${runs[@]}"; do
      echo "--- $prog $ladder_args" | tee -a "$OUT/ladder$n.txt"
      # shellcheck disable=SC2086
      timeout 300 "./$ladder_dir/$prog" $ladder_args 2>&1 | tee -a "$OUT/ladder$n.txt"
      # A failed or hung run: profiling the same launches would only spend the call's time.
      ((PIPESTATUS[0] == 0)) || { ok=0; break; }
    done
    if ((!ok)); then echo "ladder $n: failed; no profile"; status=1; continue; fi
    ladder_args=${runs[0]}  # ncu profiles the first run's launches
    [[ -n ${MOE_EP_LADDER_NCU:-} ]] || continue
    if [[ -z $ncu_bin ]]; then echo "no ncu on this machine"; status=1; continue; fi
    rep=/tmp/ncu-ladder$n
    # shellcheck disable=SC2086
    timeout "${MOE_EP_NCU_TIMEOUT:-240}" "$ncu_bin" --clock-control none --launch-count "${MOE_EP_LADDER_NCU_LAUNCHES:-5}" --set full \
      --import-source yes -f -o "$rep" "./$ladder_dir/$prog" $ladder_args --rounds 1 --repeats 1 > "/tmp/ncu-ladder$n.log" 2>&1 || status=1
    # ncu's own output joins the step's (3 files a step: 8 come back from a call).
    "$ncu_bin" --import "$rep.ncu-rep" --csv --page details > "$OUT/ncu-ladder$n.csv" 2>> "/tmp/ncu-ladder$n.log" || status=1
    "$ncu_bin" --import "$rep.ncu-rep" --csv --page source --print-source sass 2>> "/tmp/ncu-ladder$n.log" \
      | gzip > "$OUT/ncu-ladder$n-source.csv.gz" || status=1
    { echo "--- ncu"; cat "/tmp/ncu-ladder$n.log"; } >> "$OUT/ladder$n.txt"
    tail -3 "/tmp/ncu-ladder$n.log"
    ls -l "$OUT/ncu-ladder$n.csv" "$OUT/ncu-ladder$n-source.csv.gz"
  done
fi

if [[ " $what " == *" power "* ]]; then
  # PyTorch's GEMMs soaked under the power limit (benchmarks/peers/power_roof.py): the roof a step's
  # grouped GEMMs meet, with the SM clock and power each settles at.
  step "power roof"
  timeout 120 python3 benchmarks/peers/power_roof.py --out "$OUT/power-roof-${MOE_EP_COMMIT:-unknown}.json" || status=1
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
