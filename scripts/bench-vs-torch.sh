#!/usr/bin/env bash
# One LoRA training step, cogvx against PyTorch + diffusers + peft, on this machine: the two run
# alternately (cogvx, torch, cogvx, torch, ...) so that both see the same machine, RUNS times
# each per row, and the ratio table is printed as Markdown (for docs/benchmarks.md).
#
#   bash scripts/bench-vs-torch.sh                       # S at 2 and 1 threads, M at 2, 5 runs each
#   bash scripts/bench-vs-torch.sh --rows "S:2" --runs 7
#   bash scripts/bench-vs-torch.sh --rows "XL:2" --runs 1 --steps 1 --warmup 0
#
# Each run prints the median and the minimum of its timed steps and its peak RSS (one JSON line,
# the same fields on both sides); a row reports the median over runs of each figure, the
# minimum over runs of the minima, and the ratios cogvx / torch.
#
# Needs: a cogvx binary (--cogvx; default target/release/cogvx, else target/debug/cogvx) and a
# Python with torch, diffusers 0.42.1 and peft (--python; default ../shared/bench/venv/bin/python):
#   python3 -m venv venv && venv/bin/pip install torch diffusers==0.42.1 peft
# The PyTorch script is ../shared/bench/torch_train_step.py (--torch-script to change).
set -euo pipefail
cd "$(dirname "$0")/.."

rows="S:2 S:1 M:2"
runs=5
steps=5
warmup=2
cogvx=""
python="../shared/bench/venv/bin/python"
script="../shared/bench/torch_train_step.py"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) rows="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --cogvx) cogvx="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --torch-script) script="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument $1 (see the comment at the top of $0)" >&2; exit 2 ;;
  esac
done
if [ -z "$cogvx" ]; then
  for c in target/release/cogvx target/debug/cogvx; do
    if [ -x "$c" ]; then cogvx="$c"; break; fi
  done
fi
[ -x "$cogvx" ] || { echo "no cogvx binary: build it (cargo build --release -p cogvx) or pass --cogvx PATH" >&2; exit 2; }
[ -x "$python" ] || { echo "no Python at $python: make the venv (see the top of $0) or pass --python PATH" >&2; exit 2; }
[ -f "$script" ] || { echo "no PyTorch script at $script: pass --torch-script PATH" >&2; exit 2; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "machine: $(nproc) CPUs, $(uname -m), load $(cut -d' ' -f1-3 /proc/loadavg); cogvx $cogvx ($("$cogvx" --version)); runs $runs, steps $steps, warm-up $warmup" >&2
for row in $rows; do
  preset=${row%%:*}
  threads=${row##*:}
  for i in $(seq 1 "$runs"); do
    echo "  $preset, $threads threads, run $i/$runs" >&2
    "$cogvx" bench train-step --preset "$preset" --threads "$threads" --steps "$steps" --warmup "$warmup" "${extra[@]}" 2>/dev/null \
      | tail -n 1 | sed "s/^/cogvx $preset $threads /" >> "$log"
    "$python" "$script" --preset "$preset" --threads "$threads" --steps "$steps" --warmup "$warmup" 2>/dev/null \
      | tail -n 1 | sed "s/^/torch $preset $threads /" >> "$log"
  done
done

python3 - "$log" <<'EOF'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    side, preset, threads, js = line.split(" ", 3)
    rows.setdefault((preset, int(threads)), {"cogvx": [], "torch": []})[side].append(json.loads(js))
print("| preset, threads | cogvx median (min) | PyTorch median (min) | **ratio of medians** | ratio of minima | peak RSS cogvx / torch |")
print("| --- | --- | --- | --- | --- | --- |")
for (preset, threads), sides in rows.items():
    c, t = sides["cogvx"], sides["torch"]
    if not c or not t:
        print(f"| {preset}, {threads} | missing runs: cogvx {len(c)}, torch {len(t)} | | | | |")
        continue
    med = lambda rs: statistics.median(r["median_s"] for r in rs)
    mn = lambda rs: min(r["min_s"] for r in rs)
    rss = lambda rs: statistics.median(r["peak_rss_mib"] for r in rs)
    print(f"| {preset}, {threads} | {med(c):.4g} s ({mn(c):.4g}) | {med(t):.4g} s ({mn(t):.4g}) "
          f"| **{med(c) / med(t):.2f}** | {mn(c) / mn(t):.2f} | {rss(c):.0f} / {rss(t):.0f} MiB ({rss(c) / rss(t):.2f}) |")
print(f"\n{len(next(iter(rows.values()))['cogvx'])} runs per side and row, alternated; "
      f"cogvx {c[0].get('impl', '?')}, torch {t[0].get('torch', '?')}.")
EOF
