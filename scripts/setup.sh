#!/usr/bin/env bash
# Sets up and builds msa: installs the build dependencies from Debian packages when any is
# missing, then configures and builds into build/ (Release, Ninja, the CUDA backend when nvcc is
# found). Safe to re-run: with everything present it only brings the build up to date.
#
# Usage: bash scripts/setup.sh
# Environment: MSA_WITH_CUDA=AUTO|ON|OFF (default AUTO), MSA_BUILD_DIR (default build),
#              MSA_JOBS (parallel build jobs, default: all cores)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
build_dir=${MSA_BUILD_DIR:-build}
with_cuda=${MSA_WITH_CUDA:-AUTO}
jobs=${MSA_JOBS:-$(nproc 2>/dev/null || echo 2)}

say() { printf '==> setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# 1. Packages. libgomp (OpenMP) comes with g++; CLI11, nlohmann-json and fmt are for the tools.
packages=(cmake ninja-build g++ libgtest-dev libcli11-dev nlohmann-json3-dev libfmt-dev)
if command -v dpkg-query >/dev/null; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
      command -v sudo >/dev/null || die "missing packages ${missing[*]}: run as root or install sudo"
      sudo=(sudo)
    fi
    say "installing ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    say "build dependencies already installed"
  fi
else
  say "no dpkg-query (not Debian-like): assuming ${packages[*]} or equivalents are installed"
fi

# 2. CUDA: CMake looks for nvcc on PATH; a toolkit in the default place counts too.
if [[ $with_cuda != OFF && -z ${CUDACXX:-} ]] && ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi

# 3. Configure (the generator is fixed at the first configure; later runs keep the cache) and build.
generator=()
[[ -f $build_dir/CMakeCache.txt ]] || generator=(-G Ninja)
mkdir -p "$build_dir"
log=$build_dir/configure.log
say "configuring $build_dir (Release, MSA_WITH_CUDA=$with_cuda; log in $log)"
cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DMSA_WITH_CUDA="$with_cuda" >"$log" 2>&1 \
  || { cat "$log"; die "cmake configure failed"; }
sed -n 's/^-- msa: /==> setup: /p' "$log"
say "building with $jobs jobs"
start=$SECONDS
cmake --build "$build_dir" -j "$jobs"
say "built in $((SECONDS - start)) s: $build_dir/bin/msa"
