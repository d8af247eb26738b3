#!/usr/bin/env bash
# The MoE-vs-dense training comparison on a GPU machine (docs/training.md). It needs, carried in .deps: the
# corpus .deps/corpus-gpu.tar.xz of tools/make_gpu_corpus.sh (or .deps/fortunes, a copy of Debian's
# /usr/share/games/fortunes), the wheels of tqdm and matplotlib for the machine's Python in .deps/wheels, and a
# GoogleTest source tree in .deps/googletest for the build. Those three (.deps/corpus-gpu.tar.xz, .deps/wheels,
# .deps/googletest) come to about 60 MB.
# Usage: OUT=/tmp/out tools/gpu_train.sh
#   TIME_BUDGET=s   training time per model (default 230)    TRAIN_ARGS="..."  replaces the model flags below
#   DATA=path       another corpus                             PROFILE=1         tools/profile_train_step.py first
#   NPROC=n         n GPUs under torchrun: the MoE model expert-parallel over them, the rest data-parallel
#   SEED=s          --seed s, and the run in $OUT/train-seed<s> (one seed a call; tools/train_seeds.py then gives
#                   the spread of the margin and of the tokens/s share over the seeds' directories)
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
if ! ls python/fastmoe/_C*.so >/dev/null 2>&1 || [ ! -d /tmp/pk ]; then
  echo "fresh machine: building and installing the training extras again"
  pk="tqdm matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil packaging tzdata"
  python3 -c "import numpy" 2>/dev/null || pk="$pk numpy"
  # shellcheck disable=SC2086  # $pk is a list of names
  python3 -m pip install -q --no-index --find-links .deps/wheels --target /tmp/pk --no-deps $pk
  OUT=$OUT bash tools/gpu_check.sh build
fi
# DATA: the corpus; the default is the larger GPU corpus of tools/make_gpu_corpus.sh when .deps has it.
if [ -z "${DATA:-}" ] && [ -f .deps/corpus-gpu.tar.xz ]; then
  tar -C /tmp -xJf .deps/corpus-gpu.tar.xz && DATA=/tmp/corpus-gpu
fi
DATA=${DATA:-.deps/fortunes}
# TRAIN_ARGS replaces the model and schedule flags below; TIME_BUDGET is the training time per model in seconds.
TRAIN_ARGS=${TRAIN_ARGS:---d-model 1024 --layers 8 --heads 16 --seq-len 32 --batch 1024 --experts 16 --moe-every 2 --top-k 2 --lr 1e-3 --warmup 200 --eval-every 250 --ckpt-every 0 --no-ffn-bias}
# PROFILE=1: first tools/profile_train_step.py on the same flags (phase times and CUDA kernels per step of both
# models) into $OUT/profile.log.
if [ "${PROFILE:-0}" = 1 ]; then
  # shellcheck disable=SC2086
  PYTHONPATH=python:/tmp/pk timeout 120 python3 tools/profile_train_step.py --device cuda --precision bf16 \
    --data "$DATA" $TRAIN_ARGS --ops --warmup-steps 20 --timed-steps 20 > "$OUT/profile.log" 2>&1
  echo "profile rc=$?"
  head -4 "$OUT/profile.log"
fi
launcher=(python3)
if [ "${NPROC:-1}" -gt 1 ]; then
  launcher=(torchrun --standalone --nproc-per-node "$NPROC")
fi
# shellcheck disable=SC2086
PYTHONPATH=python:/tmp/pk timeout "${TRAIN_TIMEOUT:-560}" "${launcher[@]}" -m fastmoe.train --device cuda --precision bf16 \
  --time-budget "${TIME_BUDGET:-230}" --data "$DATA" $TRAIN_ARGS ${SEED:+--seed "$SEED"} --no-progress \
  --out "$OUT/train${SEED:+-seed$SEED}" > "$OUT/train${SEED:+-seed$SEED}.log" 2>&1
echo "rc=$?"
tail -30 "$OUT/train${SEED:+-seed$SEED}.log"
