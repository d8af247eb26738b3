#!/usr/bin/env bash
# The MoE-vs-dense training comparison on one GPU (docs/training.md). Needs the corpus in .deps/fortunes (a copy of
# Debian's /usr/share/games/fortunes without the *.u8 links) and the extras of tools/gpu_targeted.sh.
# Usage: OUT=/tmp/out tools/gpu_train.sh
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name --format=csv,noheader
if ! ls python/fastmoe/_C*.so >/dev/null 2>&1 || [ ! -d /tmp/pk ]; then
  echo "fresh machine: building and installing the training extras again"
  pk="tqdm matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil packaging tzdata"
  python3 -c "import numpy" 2>/dev/null || pk="$pk numpy"
  python3 -m pip install -q --no-index --find-links .deps/wheels --target /tmp/pk --no-deps $pk
  OUT=$OUT bash tools/gpu_check.sh build
fi
PYTHONPATH=python:/tmp/pk timeout "${TRAIN_TIMEOUT:-560}" python3 -m fastmoe.train --device cuda --precision bf16 --time-budget 100 \
  --data .deps/fortunes --d-model 512 --layers 6 --heads 8 --seq-len 256 --batch 32 --experts 16 --top-k 2 \
  --eval-every 200 --no-progress --out $OUT/train > $OUT/train.log 2>&1; echo "rc=$?"
tail -30 $OUT/train.log
