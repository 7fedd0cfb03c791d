#!/usr/bin/env bash
# One command for a CUDA machine (one H100/H200, no internet needed once benchmarks/.venv exists):
#
#   bash benchmarks/gpu_check.sh                  # everything, on cuda
#   bash benchmarks/gpu_check.sh --models small --repeats 5
#   bash benchmarks/gpu_check.sh --device cpu --models tiny --repeats 1 --out /tmp/check
#
# What it does, after `bash benchmarks/setup_env.sh` (idempotent: it only checks the imports
# when benchmarks/.venv is ready, and this script installs nothing beyond what it installs):
#   1. replays the recorded TensorFlow trajectories (tests/tf_reference/tf_<dtype>.json, four
#      dtypes) on the device through functional_ema's public API, under both engine
#      strategies (batched, direct), and prints a PASS/FAIL line per dtype and strategy;
#   2. times every candidate of benchmarks/_candidates.py side by side (ResNet-50, ViT-B/16,
#      the 4000-small-tensor model, bf16 ResNet-50 with fp32 averages; functional_ema's
#      adapter, update_ and pure update under each strategy) with the benchmark's harness;
#   3. counts each candidate's launches per update with torch.profiler (CUDA kernels, memcpy,
#      memset).
# It writes docs/benchmarks_cuda.md (table: median ms, x bound, x fastest peer, launches per
# update, check; GPU name, torch version, date) and docs/benchmarks_cuda.png (--out DIR
# elsewhere; with --device cpu the files are gpu_check_cpu.*). It exits 1 when a TF replay
# differs from TensorFlow, 2 on a bad option or when CUDA is unavailable.
#
# Time: sized for under 8 minutes on one H100 (an estimate, not yet timed on one: setup check
# ~15 s; TF replays with the compiled kernels' first builds 1-2 min; the four models ~3 min at
# 20 timed rounds). On 2 CPU cores, `--device cpu --models tiny --repeats 1` takes ~25 s. Options (passed to benchmarks/gpu_check.py): --device {cuda,cpu} --repeats N
# --models M ... (resnet50 vit_b_16 small resnet50_bf16 bank tiny) --out DIR
# --no-kernel-replay.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

# The interpreter: GPU_CHECK_PYTHON if set; else benchmarks/.venv (made or checked by
# setup_env.sh) where it exists; else, on a machine without package registries whose python3
# already holds a CUDA torch (the lent GPU machines), that python3, with any wheels carried
# in .whl/ (optree, which such an image lacks) installed into /tmp/site first.
cd "$root"
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    python="$GPU_CHECK_PYTHON"
elif [ ! -x "$here/.venv/bin/python" ] \
    && python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    python=python3
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if ! python3 -c "import optree" 2>/dev/null; then
        echo "gpu_check: python3 has torch but not optree: carry its wheel in .whl/" \
            "(see benchmarks/README.md, 'On a machine without package registries')." >&2
        exit 2
    fi
else
    bash "$here/setup_env.sh"
    python="$here/.venv/bin/python"
fi
PYTHONPATH="$root:$here${PYTHONPATH:+:$PYTHONPATH}" exec "$python" "$here/gpu_check.py" "$@"
