#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on a bare GPU machine (torch, transformers, peft, accelerate,
# safetensors, opencv and the rest already there; diffusers, omegaconf and importlib_metadata not) into .whl/ at the
# repository's root, for Python 3.12 on x86-64. Run where pip reaches PyPI; keep .whl/ out of git.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
  diffusers==0.42.1 omegaconf==2.4.0 importlib_metadata==10.2.0
ls -l .whl
