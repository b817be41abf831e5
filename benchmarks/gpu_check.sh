#!/usr/bin/env bash
# The GPU check of issue 18, as a GPU machine runs it: set up (vLLM if it can be installed), then one script that
# builds the same small dataset with vLLM and transformers on one GPU and on all of them (benchmarks/gpu_check.py).
# At most about 8 minutes.   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    $PY -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet torch  # the CUDA build the index serves for this machine
    .venv/bin/python -m pip install --quiet -e '.[dev]'
fi
.venv/bin/python -c "import vllm" 2>/dev/null || timeout 240 .venv/bin/python -m pip install --quiet vllm \
    || echo "vLLM could not be installed here (no registry reachable?): the check runs the transformers engine only"
nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv || true
MAGPIE_BUILDER_CACHE=${MAGPIE_BUILDER_CACHE:-.cache/magpie_builder} timeout 480 .venv/bin/python benchmarks/gpu_check.py "$@"
