#!/usr/bin/env bash
# The GPU check: subject training and controlled renders on CUDA in float16 and bfloat16 under each offload mode
# (the `gpu`-marked tests, tests/test_gpu.py), then one table of seconds per step and per render and peak memory
# for SD 1.5 + AnimateDiff (512x512x16) and Zeroscope (576x320x24) on random weights of their real architectures
# (benchmarks/gpu_check.py), then `studio bench` on the same layouts (JSON into $OUT). Writes no video; several
# minutes on one recent GPU (not measured yet).
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
  "$py" -m studio.cli bench --device cpu --model tiny --rounds 1 --warmup 0 --tune-steps 1 --json "$home/bench.json"
else
  export SHOT_STUDIO_CHECK_DEVICE=cuda
  "$py" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
  "$py" benchmarks/gpu_check.py
  # studio bench (studio/bench.py) on random weights of the real layouts (presets/configs/): at each preset's own
  # size (SD 1.5 + AnimateDiff 16 frames 512x512, 25 steps; Zeroscope 24 frames 576x320, 40 steps), then at the
  # reduced CPU size for comparison; one JSON per run into $OUT (or runs/gpu).
  out="${OUT:-runs/gpu}"
  mkdir -p "$out"
  bench() { "$py" -m studio.cli bench --device cuda --random-weights "$@"; }
  bench --model animatediff-sd15 --rounds 5 --json "$out/bench-animatediff-sd15.json"
  bench --model zeroscope --rounds 5 --json "$out/bench-zeroscope.json"
  bench --model animatediff-sd15 --width-factor 0.125 --set width=64 --set height=64 --set frames=8 --set steps=10 \
        --rounds 11 --tune-steps 0 --json "$out/bench-animatediff-sd15-reduced.json"
  bench --model zeroscope --width-factor 0.125 --set width=96 --set height=64 --set frames=8 --set steps=10 \
        --rounds 11 --tune-steps 0 --json "$out/bench-zeroscope-reduced.json"
fi
