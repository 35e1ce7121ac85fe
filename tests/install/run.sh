#!/usr/bin/env bash
# Install-package test: installs the msa build in BUILD_DIR into a scratch prefix, then
# configures, builds and runs the consumer project of this directory against that prefix.
# Usage: tests/install/run.sh BUILD_DIR [WORK_DIR]   (WORK_DIR is wiped; default: a temp dir)
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 BUILD_DIR [WORK_DIR]" >&2
  exit 2
fi
build=$(cd "$1" && pwd)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ $# -ge 2 ]]; then
  work=$2
  rm -rf "$work"
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi

generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi

echo "install test: cmake --install $build --prefix $work/prefix"
cmake --install "$build" --prefix "$work/prefix" >"$work/install.log"
echo "install test: building the consumer project against the installed package"
# Only the prefix is given: the consumer must not see the source or build tree.
cmake -S "$here" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$work/prefix" >"$work/configure.log" || { cat "$work/configure.log"; exit 1; }
cmake --build "$work/build" >"$work/build.log" || { cat "$work/build.log"; exit 1; }
"$work/build/consumer"
