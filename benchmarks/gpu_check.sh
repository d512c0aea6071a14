#!/usr/bin/env bash
# The GPU check in one call, for a bare GPU machine whose python3 has PyTorch with CUDA and nothing
# of this project's (no FFCV, no Ray, no network). It
#   1. installs the pure-Python dependencies that python3 lacks from the wheels beside it
#      (benchmarks/wheels/, --no-index, into a temporary target on PYTHONPATH);
#   2. runs the CUDA-only tests;
#   3. runs benchmarks/gpu_check.py: DeACL / ACL-DS / RoCL steps at bf16 and fp32, eager and
#      torch.compile, NCHW and channels_last (img/s, MFU, peak memory), bf16 vs fp32 loss and
#      gradients; one JSON, $OUT/gpu_check.json.
# Usage: benchmarks/gpu_check.sh [--dry-run]     (--dry-run: CPU, tiny model, seconds; what CI runs)
# Environment: OUT (default ./gpu_check_out), PYTHON (default python3), GPU_CHECK_BUDGET_S (default 240).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-python3}"
out="${OUT:-$PWD/gpu_check_out}"
dry=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry="--dry-run" ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$arg' (allowed: --dry-run)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT

# dependency groups: an import that must work -> the wheels (name prefixes) that provide it together
groups=(
  "import hydra, omegaconf, antlr4|hydra_core omegaconf antlr4_python3_runtime"
  "import pydantic, sys; sys.exit(pydantic.VERSION[0] != '2')|pydantic pydantic_core annotated_types typing_inspection typing_extensions"
)
# the one compiled wheel (pydantic_core) is built for the GPU image's CPython 3.12 on x86_64
abi="$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')" || {
  echo "gpu_check.sh: cannot run '$py' (set PYTHON to a python with PyTorch)" >&2; exit 2; }
wheels=()
for g in "${groups[@]}"; do
  check="${g%%|*}"
  "$py" -c "$check" 2>/dev/null && continue
  for name in ${g#*|}; do
    found=("$here"/wheels/"$name"-*.whl)
    if [ ! -e "${found[0]}" ]; then
      echo "gpu_check.sh: benchmarks/wheels/ has no $name wheel; run benchmarks/wheels/fetch.sh where pip can download" >&2
      exit 2
    fi
    case "${found[0]##*/}" in
      *-none-any.whl|*-"$abi"-*"$(uname -m)"*) ;;
      *) names="${g#*|}"
         echo "gpu_check.sh: $py ($abi, $(uname -m)) lacks ${names%% *}, and benchmarks/wheels/${found[0]##*/}" \
              "is built for another Python or machine: install it there (pyproject.toml's pin), or use CPython 3.12 on x86_64" >&2
         exit 2 ;;
    esac
    wheels+=("${found[@]}")
  done
done
"$py" -c "import yaml, numpy, pytest, packaging, torchvision" 2>/dev/null || {
  echo "gpu_check.sh: $py lacks PyYAML, numpy, pytest, packaging or torchvision (the GPU image has them;" \
       "add their wheels to benchmarks/wheels/)" >&2
  exit 2
}
if [ "${#wheels[@]}" -gt 0 ]; then
  echo "# installing ${#wheels[@]} wheels into $site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" || exit 1
fi
export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

cd "$root" || exit 1
echo "# CUDA-only tests"
"$py" -m pytest -q -p no:cacheprovider -o addopts="" -rs tests/test_augment.py -k gpu 2>&1 | tee "$out/cuda_tests.log"
export GPU_CHECK_TESTS_RC="${PIPESTATUS[0]}"
echo "# steps"
"$py" benchmarks/gpu_check.py $dry --out "$out/gpu_check.json" --tests-log "$out/cuda_tests.log" \
  --budget-s "${GPU_CHECK_BUDGET_S:-240}"
