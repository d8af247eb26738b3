#!/usr/bin/env bash
# Weak-scaling run of the expert-parallel benchmark on the local GPUs: benchmarks/bench_ep.py under torchrun at
# each W, then the summary tables.
#
#   benchmarks/run_ep_scaling.sh [W ...]          # default: 1 2 4 8 up to the number of visible GPUs
#   OUT=/tmp/out PYTHON=python3 benchmarks/run_ep_scaling.sh 1 2 4 -- --config mixtral --iters 30
#
#   DEVICE=cpu benchmarks/run_ep_scaling.sh 1 2 -- --tiny     # gloo on CPU (default W: 1 2), to try the script
#
# Arguments after "--" go to bench_ep.py. Writes $OUT/bench_ep.jsonl (appended) and $OUT/bench_ep_summary.md
# (OUT defaults to /tmp/fastmoe-bench). Needs no network: torchrun runs standalone on this host. PYTHON (default
# python3) is the interpreter; torchrun is used when it is on PATH and PYTHON is not set, otherwise
# "$PYTHON -m torch.distributed.run".
set -euo pipefail

cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ] && command -v torchrun > /dev/null; then
  launcher=(torchrun)
else
  launcher=("${PYTHON:-python3}" -m torch.distributed.run)
fi
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/fastmoe-bench}
mkdir -p "$OUT"

# The package built in place (FASTMOE_PYTHON_INPLACE=ON) lives in python/.
if compgen -G "python/fastmoe/_C*.so" > /dev/null; then
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi

sizes=()
extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then
    shift
    extra=("$@")
    break
  fi
  sizes+=("$1")
  shift
done

if [ "$DEVICE" = cpu ]; then
  [ "${#sizes[@]}" -gt 0 ] || sizes=(1 2)
  gpus=$(printf '%s\n' "${sizes[@]}" | sort -n | tail -1)  # CPU ranks: any W (slowly)
else
  gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
fi
if [ "${#sizes[@]}" -eq 0 ]; then
  w=1
  while [ "$w" -le "$gpus" ]; do
    sizes+=("$w")
    w=$((w * 2))
  done
  if [ "${#sizes[@]}" -eq 0 ]; then
    echo "run_ep_scaling: no visible GPU (torch.cuda.device_count() = 0)" >&2
    exit 2
  fi
fi
for w in "${sizes[@]}"; do
  if ! [[ "$w" =~ ^[1-9][0-9]*$ ]] || [ "$w" -gt "$gpus" ]; then
    echo "run_ep_scaling: W=$w is not a GPU count between 1 and the $gpus visible GPUs" >&2
    exit 2
  fi
done

for w in "${sizes[@]}"; do
  echo "== W=$w" >&2
  "${launcher[@]}" --standalone --nproc-per-node "$w" benchmarks/bench_ep.py --out "$OUT/bench_ep.jsonl" \
    --device "$DEVICE" ${extra[@]+"${extra[@]}"}
done
"$PYTHON" benchmarks/summarize_ep.py "$OUT/bench_ep.jsonl" | tee "$OUT/bench_ep_summary.md"
