#!/usr/bin/env bash
# Installs the system packages the build needs when they are missing: GoogleTest and GoogleMock (for the C++
# tests), clang-format (for make lint) and Debian's fortunes (the English text fastmoe-train and make demo
# train on, /usr/share/games/fortunes). cmake and ninja come from PyPI through the venv.
set -euo pipefail
missing=()
if ! ls /usr/lib/*/cmake/GTest/GTestConfig.cmake /usr/lib/cmake/GTest/GTestConfig.cmake >/dev/null 2>&1; then
  missing+=(libgtest-dev)
fi
if ! ls /usr/include/gmock/gmock.h >/dev/null 2>&1; then
  missing+=(libgmock-dev)
fi
if ! command -v clang-format >/dev/null 2>&1; then
  missing+=(clang-format)
fi
if ! [[ -f /usr/share/games/fortunes/fortunes ]]; then
  missing+=(fortunes)
fi
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "fastmoe: please install: ${missing[*]}" >&2
    exit 1
  fi
  echo "fastmoe: installing ${missing[*]} from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
