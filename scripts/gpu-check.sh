#!/usr/bin/env bash
# The GPU check of the real-resolution work, for a machine with one NVIDIA GPU (H100/H200) and
# no network: only a cogvx binary built with CUDA, this script and the tiny reference data.
#
#   here:   cargo build --release -p cogvx --features cuda
#           copy target/release/cogvx, scripts/gpu-check.sh and ../shared/reference (cases/ and
#           models/, 19 MiB) to the GPU machine
#   there:  bash gpu-check.sh ./cogvx ./reference/cases out/
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
cat "$OUT/summary.jsonl"
