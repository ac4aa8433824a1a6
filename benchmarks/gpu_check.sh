#!/usr/bin/env bash
# One-shot GPU check (benchmarks/gpu_check.py): (a) the training benchmark on blip2-opt-2.7b and
# blip2-flan-t5-xl built with random weights, ours vs the HF notebook, bf16, micro-batch 20 and 40;
# (b) a short real run through the deepspeed launcher on one GPU with a checkpoint, a resume and one
# evaluation. Writes OUT_DIR/gpu_check.json (default runs/gpu_check). One GPU, <= 9 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # or: make gpu-check
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR  # CPU, tiny models, the same steps (what the tests run)
#
# The GPU machine needs torch, transformers, peft, accelerate and tensorboard. DeepSpeed, webdataset
# and pycocoevalcap (and what of their dependencies it lacks) come as wheels in .whl/ at the
# repository root, installed here without any index; build them where a package index is reachable,
# for the GPU machine's Python version (3.11 below; see docs/models.md):
#   pip wheel --no-deps -w .whl deepspeed==0.19.8 webdataset==1.0.2 pycocoevalcap==1.2 \
#       hjson py-cpuinfo einops braceexpand annotated-types typing-inspection
#   pip download --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
#       --no-deps -d .whl pydantic pydantic-core msgpack ninja
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    # Only what is missing: the installed torch/transformers stay as they are.
    "$PYTHON" -m pip install -q --no-index --find-links .whl deepspeed webdataset
    # pycocoevalcap's declared pycocotools (and its matplotlib) is not used by the scorers we import.
    "$PYTHON" -m pip install -q --no-index --no-deps --find-links .whl pycocoevalcap
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
