#!/usr/bin/env bash
# The GPU check: `studio bench` (studio/bench.py) on CUDA for the real presets' layouts, random weights of their
# published configs at full width (presets/configs/; nothing to download), at each preset's own size (SD 1.5 +
# AnimateDiff: 16 frames 512x512, 25 steps; Zeroscope: 24 frames 576x320, 40 steps), then the same at the reduced
# CPU size for comparison. Writes one JSON per run into $OUT (or runs/gpu) and prints the tables.
#
#   bash benchmarks/gpu_check.sh [extra studio bench flags, e.g. --rounds 3 --tune-steps 0]
#
# Where the machine's python3 already has torch with CUDA but not the studio's other packages and no network (the
# device machines of this project), carry wheels in .whl/ (see /work/.library/device/README.md): diffusers,
# omegaconf, antlr4-python3-runtime, and whatever `pip show` there says is missing; they are installed to /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export SHOT_STUDIO_HOME="${SHOT_STUDIO_HOME:-/tmp/studio-home}"
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
bench() { python3 -m studio.cli bench --device cuda --random-weights "$@"; }
bench --model animatediff-sd15 --rounds 5 --json "$OUT/bench-animatediff-sd15.json" "$@"
bench --model zeroscope --rounds 5 --json "$OUT/bench-zeroscope.json" "$@"
bench --model animatediff-sd15 --width-factor 0.125 --set width=64 --set height=64 --set frames=8 --set steps=10 \
      --rounds 11 --tune-steps 0 --json "$OUT/bench-animatediff-sd15-reduced.json" "$@"
bench --model zeroscope --width-factor 0.125 --set width=96 --set height=64 --set frames=8 --set steps=10 \
      --rounds 11 --tune-steps 0 --json "$OUT/bench-zeroscope-reduced.json" "$@"
