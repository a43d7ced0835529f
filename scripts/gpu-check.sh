#!/usr/bin/env bash
# The GPU check of the real-resolution work, for a machine with one NVIDIA GPU (H100/H200) and
# no network: only a cogvx binary built with CUDA, this script and the tiny reference data.
#
#   here:   cargo build --release -p cogvx --no-default-features --features cuda
#           (without the `mpi` feature the binary needs no libmpi on the GPU machine)
#           copy target/release/cogvx, scripts/gpu-check.sh and ../shared/reference (cases/ and
#           models/, 19 MiB) to the GPU machine
#   there:  bash gpu-check.sh ./cogvx ./reference/cases out/
#
# With two GPUs and Open MPI there (`mpirun` on the PATH), DP_BIN (a cogvx built with
# `--features cuda,mpi`) and DP_EXAMPLES (a copy of the repository's examples/ folder) add
#   dp-2gpu    `cogvx launch --nproc-per-node 2` of 4 LoRA steps of the tiny 2B model at batch 1
#              against one process at batch 2 on one GPU: the last losses must agree to 1e-4.
#
# Runs, each with its wall time and the GPU's peak memory (nvidia-smi sampled every 100 ms):
#   parity     the 35 diffusers parity cases of the tiny models on the GPU (exit 0 = all pass)
#   attention  forward + backward of the memory-efficient attention at [1, 30, 17776, 64]
#              (CogVideoX-2B at 49x480x720), time and GFLOP/s
#   gemm-*     matrix-product throughput at the 2B feed-forward's shape, f32 and bf16
#   step-xl    one LoRA training step of one CogVideoX-2B-width block at 17,776 tokens
#   step-xl30  the same with 30 blocks (CogVideoX-2B's depth), gradient checkpointing and
#              mixed precision (bf16 frozen weights and compute)
# and writes out/summary.jsonl (one JSON object per check) plus each command's output. Each
# check has a time limit (LIMIT seconds, default 115; 30 for the products), so the whole script
# ends within 9 minutes.
set -uo pipefail
BIN=${1:?usage: gpu-check.sh COGVX_BIN CASES_DIR [OUT_DIR]}
CASES=${2:?usage: gpu-check.sh COGVX_BIN CASES_DIR [OUT_DIR]}
OUT=${3:-gpu-check-out}
LIMIT=${LIMIT:-115}
mkdir -p "$OUT"
: > "$OUT/summary.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || echo "nvidia-smi failed" >> "$OUT/gpu.txt"
"$BIN" --version > "$OUT/version.txt" 2>&1

# check NAME COMMAND...: runs COMMAND with a time limit, sampling the GPU memory in use.
check() {
  local name=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/$name.mem" 2>/dev/null &
  local smi=$!
  local start end rc peak
  start=$(date +%s.%N)
  timeout "$LIMIT" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  rc=$?
  end=$(date +%s.%N)
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  peak=$(sort -n "$OUT/$name.mem" 2>/dev/null | tail -n 1)
  printf '{"check":"%s","exit":%d,"wall_s":%.1f,"gpu_mem_peak_mib":%s,"result":%s}\n' \
    "$name" "$rc" "$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')" "${peak:-null}" \
    "$(grep -E '^\{' "$OUT/$name.out" | tail -n 1 | grep . || echo null)" >> "$OUT/summary.jsonl"
  echo "$name: exit $rc"
}

check parity "$BIN" --device cuda parity "$CASES"
check attention "$BIN" --device cuda bench attention --batch 1 --heads 30 --len 17776 --head-dim 64
LIMIT=30 check gemm-f32 "$BIN" --device cuda bench gemm --repeat 10
LIMIT=30 check gemm-bf16 "$BIN" --device cuda bench gemm --repeat 10 --dtype bf16
check step-xl "$BIN" --device cuda bench train-step --preset XL --steps 2 --warmup 1
check step-xl30 "$BIN" --device cuda bench train-step --preset XL30 --steps 1 --warmup 0 --gradient-checkpointing --mixed-precision bf16
# The two-GPU part (data parallel through MPI; each process takes the GPU of its local rank).
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
if [ "$gpus" -ge 2 ] && [ -n "${DP_BIN:-}" ] && [ -n "${DP_EXAMPLES:-}" ] && command -v mpirun >/dev/null; then
  dp_config() { # NAME BATCH
    cat > "$OUT/$1.toml" <<TOML
[model]
path = "$DP_EXAMPLES/models/cogvideox-2b-tiny"
[data]
root = "$DP_EXAMPLES/datasets/mini"
resolution = "9x64x96"
cache_dir = "$OUT/dp-cache"
[train]
output_dir = "$OUT/$1"
max_steps = 4
batch_size = $2
learning_rate = 1e-3
tensorboard = false
TOML
  }
  dp_config dp-two 1
  dp_config dp-one 2
  "$DP_BIN" --device cuda --config "$OUT/dp-one.toml" prepare > "$OUT/dp-prepare.out" 2>&1
  check dp-one "$DP_BIN" --device cuda --config "$OUT/dp-one.toml" train
  check dp-2gpu "$DP_BIN" launch --nproc-per-node 2 -- --device cuda --config "$OUT/dp-two.toml" train
  a=$(grep -o 'last loss [0-9.e+-]*' "$OUT/dp-one.out" | awk '{print $3}')
  b=$(grep -o 'last loss [0-9.e+-]*' "$OUT/dp-2gpu.out" | awk '{print $3}')
  if [ -n "$a" ] && [ -n "$b" ] && awk -v a="$a" -v b="$b" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= 1e-4 * (a < 0 ? -a : a)) }'; then
    echo "{\"check\":\"dp-2gpu-vs-batch-2\",\"exit\":0,\"one\":$a,\"two\":$b}" >> "$OUT/summary.jsonl"
  else
    echo "{\"check\":\"dp-2gpu-vs-batch-2\",\"exit\":1,\"one\":\"$a\",\"two\":\"$b\"}" >> "$OUT/summary.jsonl"
  fi
else
  echo "dp-2gpu: skipped ($gpus GPU(s); needs 2, DP_BIN, DP_EXAMPLES and mpirun)"
fi
cat "$OUT/summary.jsonl"
