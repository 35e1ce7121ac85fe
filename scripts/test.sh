#!/usr/bin/env bash
# The test command: sets up and builds msa (scripts/setup.sh, quick when already done), then runs
# every test with ctest: the unit tests, the msa CLI checks and the install-package test.
#
# Usage: bash scripts/test.sh [extra ctest arguments, e.g. -R index]
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=${MSA_BUILD_DIR:-build}
jobs=${MSA_JOBS:-$(nproc 2>/dev/null || echo 2)}

bash "$root/scripts/setup.sh"
printf '==> test: ctest in %s\n' "$build_dir"
cd "$root"
ctest --test-dir "$build_dir" --output-on-failure -j "$jobs" "$@"
