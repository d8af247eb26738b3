#!/usr/bin/env bash
# clang-format over the C++/CUDA sources; --check fails on any file that would change.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(find csrc include tests/cpp tests/libtorch examples/cpp -type f \
  \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null | sort)
if [[ "${1:-}" == "--check" ]]; then
  clang-format --dry-run -Werror "${files[@]}"
  echo "clang-format: ${#files[@]} files clean"
else
  clang-format -i "${files[@]}"
fi
