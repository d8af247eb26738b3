#!/usr/bin/env bash
# Weak-scaling run of the expert-parallel benchmark on the local GPUs: benchmarks/bench_ep.py under torchrun at
# each W, then the summary tables.
#
#   benchmarks/run_ep_scaling.sh [W ...]          # default: 1 2 4 8 up to the number of visible GPUs
#   OUT=/tmp/out PYTHON=python3 benchmarks/run_ep_scaling.sh 1 2 4 -- --config mixtral --iters 30
#
#   DEVICE=cpu benchmarks/run_ep_scaling.sh 1 2 -- --tiny     # gloo on CPU (default W: 1 2), to try the script
#   VARIANTS="plain chunked hierarchical replicate" benchmarks/run_ep_scaling.sh 1 2 4 8
#
# Arguments after "--" go to bench_ep.py. Writes $OUT/bench_ep.jsonl (appended) and $OUT/bench_ep_summary.md
# (OUT defaults to /tmp/fastmoe-bench). Needs no network: torchrun runs standalone on this host. PYTHON (default
# python3) is the interpreter; torchrun is used when it is on PATH and PYTHON is not set, otherwise
# "$PYTHON -m torch.distributed.run".
#
# VARIANTS (default "plain") picks the variants of fastmoe's layer to run at each W, each with bench_ep.py flags
# of its own before those after "--" (a later flag wins, so "-- --config fine" replaces a variant's configs):
#   plain         the flags after "--" only: $OUT/bench_ep.jsonl, $OUT/bench_ep_summary.md
#   chunked       --ep-chunks $EP_CHUNKS (default 2), chunked overlap
#   hierarchical  --ep-exchange hierarchical --ep-local-size W/2: the two-level exchange forced as 2 nodes of
#                 W/2 ranks (W = 1 runs the flat exchange of a one-rank group, the table's reference; odd W > 1
#                 are skipped)
#   skew          $SKEW_ARGS (default "--skew 0.5 --config mixtral paper"): the skewed router, no replication
#   replicate     --replicate 2 $SKEW_ARGS: hot-expert replication under the same skewed router
# Each variant but plain writes $OUT/bench_ep_<variant>.jsonl and $OUT/bench_ep_<variant>_summary.md. --skew 0.5
# needs k <= 2, hence mixtral and paper (fine has k = 6: --skew at most 1/6).
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
VARIANTS=${VARIANTS:-plain}
EP_CHUNKS=${EP_CHUNKS:-2}
SKEW_ARGS=${SKEW_ARGS:---skew 0.5 --config mixtral paper}
mkdir -p "$OUT"
read -r -a variants <<< "$VARIANTS"
[ "${#variants[@]}" -gt 0 ] || { echo "run_ep_scaling: VARIANTS is empty" >&2; exit 2; }
for variant in "${variants[@]}"; do
  case "$variant" in
    plain | chunked | hierarchical | skew | replicate) ;;
    *)
      echo "run_ep_scaling: VARIANTS has '$variant'; known: plain chunked hierarchical skew replicate" >&2
      exit 2
      ;;
  esac
done

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

# the JSON lines file of a variant (its own, so that the summary's tables keep the variants apart)
jsonl() { if [ "$1" = plain ]; then echo "$OUT/bench_ep.jsonl"; else echo "$OUT/bench_ep_$1.jsonl"; fi; }

read -r -a skew_args <<< "$SKEW_ARGS"
ran=()
for w in "${sizes[@]}"; do
  for variant in "${variants[@]}"; do
    case "$variant" in
      plain) args=() ;;
      chunked) args=(--ep-chunks "$EP_CHUNKS") ;;
      hierarchical)
        if [ "$w" -gt 1 ] && [ $((w % 2)) -ne 0 ]; then
          echo "== W=$w $variant: skipped (2 nodes of W/2 ranks need an even W)" >&2
          continue
        fi
        args=(--ep-exchange hierarchical --ep-local-size $((w > 1 ? w / 2 : 1)))
        ;;
      skew) args=(${skew_args[@]+"${skew_args[@]}"}) ;;
      replicate) args=(--replicate 2 ${skew_args[@]+"${skew_args[@]}"}) ;;
    esac
    if [ "${#variants[@]}" -gt 1 ] || [ "$variant" != plain ]; then
      echo "== W=$w $variant" >&2
    else
      echo "== W=$w" >&2
    fi
    "${launcher[@]}" --standalone --nproc-per-node "$w" benchmarks/bench_ep.py --out "$(jsonl "$variant")" \
      --device "$DEVICE" ${args[@]+"${args[@]}"} ${extra[@]+"${extra[@]}"}
    [[ " ${ran[*]-} " == *" $variant "* ]] || ran+=("$variant")
  done
done
for variant in "${ran[@]}"; do
  if [ "$variant" = plain ]; then
    summary="$OUT/bench_ep_summary.md"
  else
    summary="$OUT/bench_ep_${variant}_summary.md"
  fi
  [ "${#ran[@]}" -eq 1 ] || echo "## $variant"
  "$PYTHON" benchmarks/summarize_ep.py "$(jsonl "$variant")" | tee "$summary"
done
