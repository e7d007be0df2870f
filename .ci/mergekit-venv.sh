#!/usr/bin/env bash
# Build a separate virtualenv with mergekit 0.1.5, for tests/test_mergekit_compat.py.
# Usage: .ci/mergekit-venv.sh [VENV_DIR]   (default: .venv-mergekit in the repo root)
# torch is installed FIRST, as the local CPU wheel torch==2.13.0, so that mergekit's
# "torch>=2.0.0" is already satisfied; mergekit is then installed with torch pinned, so pip fails
# instead of pulling another (multi-GB CUDA) torch, and the result is checked afterwards.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv-mergekit}"
torch_version="2.13.0"
rm -rf "$venv"
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q "torch==$torch_version"
echo "torch==$torch_version" > "$venv/torch-constraint.txt"
"$py" -m pip install -q -c "$venv/torch-constraint.txt" "mergekit==0.1.5"
got="$("$py" -c 'import torch; print(torch.__version__)')"
cuda="$("$py" -c 'import torch; print(torch.version.cuda)')"
if [[ "$got" != "$torch_version" && "$got" != "$torch_version+cpu" ]] || [[ "$cuda" != "None" ]]; then
  echo "ERROR: $venv has torch $got (CUDA $cuda); expected the CPU wheel torch==$torch_version" >&2
  exit 1
fi
"$venv/bin/mergekit-yaml" --help > /dev/null
echo "mergekit $("$py" -c 'from importlib.metadata import version; print(version("mergekit"))') ready in $venv (torch $got)"
