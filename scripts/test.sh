#!/usr/bin/env bash
# The test command: sets up and builds msa (scripts/setup.sh, quick when already done), then runs
# every test with ctest: the unit tests, the msa CLI checks and the install-package test; then,
# when the build has the torch layer (torch was importable, see scripts/setup_torch.sh), its
# pytest suite python/tests.
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

# The interpreter the build found torch with (python/CMakeLists.txt picks it the same way).
lib=$build_dir/lib/libmsa_torch.so
[[ $lib == /* ]] || lib=$root/$lib
py=${MSA_PYTHON:-$(sed -n 's/^MSA_PYTHON:FILEPATH=//p' "$build_dir/CMakeCache.txt" 2>/dev/null)}
if [[ -z $py ]]; then
  if [[ -x $root/.venv/bin/python ]]; then py=$root/.venv/bin/python; else py=python3; fi
fi
if [[ ! -f $lib ]]; then
  printf '==> test: no torch layer in %s (torch not installed: scripts/setup_torch.sh); pytest skipped\n' "$build_dir"
elif ! "$py" -c 'import torch, pytest' 2>/dev/null; then
  printf '==> test: %s cannot import torch and pytest; pytest skipped\n' "$py"
else
  printf '==> test: pytest python/tests (%s)\n' "$lib"
  rc=0
  MSA_TORCH_LIBRARY=$lib "$py" -m pytest -q -rs -p no:cacheprovider python/tests || rc=$?
  # 5: no tests collected, which is not a failure of the code under test.
  if ((rc == 5)); then
    printf '==> test: pytest collected no tests\n'
  elif ((rc != 0)); then
    exit "$rc"
  fi
fi
