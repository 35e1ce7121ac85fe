#!/usr/bin/env bash
# Installs the pinned PyTorch (and pytest) that the msa torch layer is built and tested against,
# from PyPI with pip. Quick when already installed.
#
# Where: into the environment of $MSA_PYTHON (default python3) when pip may install there (a
# virtual environment, or an interpreter of the user's own such as pyenv's); for an interpreter
# that Debian manages (PEP 668 "externally managed"), into a virtual environment .venv at the
# repository root, which the CMake build and scripts/test.sh pick up by themselves.
#
# PyPI serves only the CUDA build of torch for Linux x86_64 (with the nvidia-* runtime wheels:
# about 3 GB of downloads, 5 GB installed); it runs on machines without a GPU too.
#
# Usage: bash scripts/setup_torch.sh
# Environment: MSA_PYTHON (the interpreter to install into), MSA_TORCH_VERSION (default the pin)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
torch_version=${MSA_TORCH_VERSION:-2.15.0}
pytest_version=9.2.0
numpy_version=2.4.6  # not needed by msa; without it torch warns at import

say() { printf '==> setup_torch: %s\n' "$*"; }
die() { printf 'setup_torch: error: %s\n' "$*" >&2; exit 1; }

py=${MSA_PYTHON:-}
if [[ -z $py ]]; then
  if [[ -x $root/.venv/bin/python ]]; then py=$root/.venv/bin/python; else py=python3; fi
fi
command -v "$py" >/dev/null || die "no Python interpreter '$py' (install python3, or set MSA_PYTHON)"

installed() {
  "$py" - "$torch_version" <<'EOF' 2>/dev/null
import sys
import torch, pytest
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] else 1)
EOF
}

if installed; then
  say "torch $torch_version and pytest already installed for $py"
  exit 0
fi

# pip refuses to install into an interpreter its distribution manages (PEP 668); a virtual
# environment in the repository is then the least surprising place.
managed=$("$py" -c 'import sys, sysconfig, os
in_venv = sys.prefix != sys.base_prefix
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
print(int(not in_venv and os.path.exists(marker)))')
if [[ $managed == 1 && -n ${MSA_PYTHON:-} ]]; then
  die "MSA_PYTHON=$MSA_PYTHON is managed by the system (PEP 668): point MSA_PYTHON at a virtual environment, or unset it to use $root/.venv"
fi
if [[ $managed == 1 ]]; then
  say "$py is managed by the system: using the virtual environment $root/.venv"
  if [[ ! -x $root/.venv/bin/python ]]; then
    if ! "$py" -m venv "$root/.venv" >/dev/null 2>&1; then
      rm -rf "$root/.venv"
      # Debian ships venv's pip bootstrap separately.
      command -v apt-get >/dev/null || die "python3 -m venv failed and there is no apt-get to install python3-venv"
      sudo=()
      [[ $(id -u) -eq 0 ]] || sudo=(sudo)
      say "installing python3-venv"
      "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
      "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv
      "$py" -m venv "$root/.venv"
    fi
  fi
  py=$root/.venv/bin/python
  installed && { say "torch $torch_version already installed in .venv"; exit 0; }
fi

say "installing torch==$torch_version pytest==$pytest_version numpy==$numpy_version for $py (several minutes the first time)"
start=$SECONDS
"$py" -m pip install --progress-bar off -q "torch==$torch_version" "pytest==$pytest_version" "numpy==$numpy_version"
installed || die "torch $torch_version is still not importable by $py after pip install"
say "installed in $((SECONDS - start)) s"
