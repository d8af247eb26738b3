#!/usr/bin/env bash
# GPU run of the parts that changed last: build, compute-sanitizer memcheck + racecheck, ctest, the reliability,
# fuzz, training and layer tests, and the EP benchmark at W=1. The GPU machine is offline: the training extras
# (tqdm, matplotlib and their dependencies) come as wheels in .deps/wheels, made beforehand with
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .deps/wheels tqdm matplotlib
# Usage: OUT=/tmp/out tools/gpu_targeted.sh
set -u
OUT=${OUT:-/tmp/out}
pk="tqdm matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil packaging tzdata"
python3 -c "import numpy" 2>/dev/null || pk="$pk numpy"
python3 -m pip install -q --no-index --find-links .deps/wheels --target /tmp/pk --no-deps $pk > $OUT/pip.log 2>&1; tail -2 $OUT/pip.log
export EXTRA=/tmp/pk
OUT=$OUT bash tools/gpu_check.sh build sanitize
(ctest --test-dir build-gpu --output-on-failure -j 8 > $OUT/ctest.log 2>&1; tail -3 $OUT/ctest.log)
./build-gpu/tests/cpp/test_kernels --gtest_filter='*EpRoute*' 2>&1 | tail -3
PYTHONPATH=python:/tmp/pk timeout 300 python3 -m pytest tests/reliability tests/fuzz tests/ops/test_autocast.py tests/ops/test_permute.py tests/ops/test_registration.py tests/train tests/nn/test_layers.py -q -rs -p no:cacheprovider > $OUT/targeted.log 2>&1; tail -12 $OUT/targeted.log
EP_SIZES="1" OUT=$OUT timeout 100 bash tools/gpu_check.sh bench_ep; grep -E "^\| 1|###" $OUT/bench_ep_summary.md
cat $OUT/summary.log
