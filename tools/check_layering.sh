#!/usr/bin/env bash
# The torch-free layer (csrc/core, csrc/kernels, csrc/ref) must not include torch, ATen or c10
# (docs/architecture.md). Fails listing every offending include.
set -euo pipefail
cd "$(dirname "$0")/.."
if hits=$(grep -rnE '^\s*#\s*include\s*[<"](torch|ATen|c10)/' csrc/core csrc/kernels csrc/ref); then
  echo "layering check FAILED: the torch-free layer includes torch/ATen/c10:" >&2
  echo "$hits" >&2
  exit 1
fi
count=$(find csrc/core csrc/kernels csrc/ref -type f \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' \) | wc -l)
echo "layering check passed: ${count} torch-free files include no torch, ATen or c10"
