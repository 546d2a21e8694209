#!/usr/bin/env bash
# The GPU check: subject training and controlled renders on CUDA in float16 and bfloat16 under each offload mode
# (the `gpu`-marked tests, tests/test_gpu.py), then one table of seconds per step and per render and peak memory
# for SD 1.5 + AnimateDiff (512x512x16) and Zeroscope (576x320x24) on random weights of their real architectures
# (benchmarks/gpu_check.py). Writes no video; about 5 minutes on one recent GPU (not measured yet).
#
#   bash benchmarks/gpu_check.sh          on a GPU machine
#   bash benchmarks/gpu_check.sh --cpu    the same code path on the CPU at a tiny size (CI runs this, so it
#                                         cannot rot)
#
# For a bare GPU machine with torch but not diffusers or omegaconf: put their wheels in .whl/ at the repository's
# root first (benchmarks/gpu_wheels.sh downloads them where pip works); they are installed into a temporary folder
# from there, nothing is fetched. The studio itself runs from the checkout (no install).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=gpu
case "${1:-}" in
  --cpu) mode=cpu ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu]" >&2; exit 2 ;;
esac
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if ! "$py" -c "import diffusers, omegaconf" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: diffusers or omegaconf is missing and .whl/ holds no wheels (run benchmarks/gpu_wheels.sh where pip works)" >&2
    exit 2
  fi
  site=$(mktemp -d /tmp/shot-studio-site.XXXXXX)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error
home=$(mktemp -d /tmp/shot-studio-home.XXXXXX)  # models built for the tests, preservation clips: thrown away
trap 'rm -rf "$home"' EXIT
export SHOT_STUDIO_HOME="$home"
if [ "$mode" = cpu ]; then
  export SHOT_STUDIO_CHECK_DEVICE=cpu OMP_NUM_THREADS=1
  "$py" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
  "$py" benchmarks/gpu_check.py --cpu --train-steps 2
else
  export SHOT_STUDIO_CHECK_DEVICE=cuda
  "$py" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
  "$py" benchmarks/gpu_check.py
fi
