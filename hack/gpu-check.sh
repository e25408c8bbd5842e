#!/usr/bin/env bash
# GPU figures for each quantization scheme: the real trainer on a model built on the spot, tokens/s
# and peak memory against the operator's estimate. See hack/gpu_check.py for the options.
#   hack/gpu-check.sh [--out FILE] [--workdir DIR] [--schemes none,bnb-4bit,...] ...
# Python: $PYTHON, else .venv/bin/python, else python3; it needs torch, transformers, peft,
# accelerate, pydantic and PyYAML (bitsandbytes for the bnb schemes, kernels for fp8/mxfp4).
# Exit codes: 0 ran (failed schemes are in the table), 3 no GPU (everything before training done).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/api:$PWD/trainer:$PWD/operator${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" hack/gpu_check.py "$@"
