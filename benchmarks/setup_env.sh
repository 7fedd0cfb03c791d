#!/usr/bin/env bash
# Create benchmarks/.venv for bench_ema.py: torch + torchvision (the models), the peers (timm,
# ema-pytorch, torch-ema, diffusers), matplotlib, and functional_ema from this
# checkout (editable, so a re-run benchmarks the current library code). The library itself
# depends on none of these.
#
#   bash benchmarks/setup_env.sh
#   benchmarks/.venv/bin/python benchmarks/bench_ema.py
#
# Idempotent: a re-run with everything in place only checks the imports (FORCE=1 reinstalls).
# Environment: PYTHON (interpreter for the venv, default python3), TORCH_VERSION (2.14.1),
# TORCHVISION_VERSION (0.29.1). torch and torchvision are pinned as a matched pair: a torchvision
# built for another torch fails to import. The first run downloads/installs ~6 GB (the torch
# 2.14.1 wheel pulls its CUDA libraries even for CPU use) and takes several minutes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"
torch_version="${TORCH_VERSION:-2.14.1}"
torchvision_version="${TORCHVISION_VERSION:-0.29.1}"

check() {
    # Succeeds when every package imports, torch/torchvision have the pinned versions and
    # functional_ema is the one in this checkout.
    "$venv/bin/python" - "$torch_version" "$torchvision_version" "$root" <<'PY'
import importlib
import importlib.metadata as md
import pathlib
import sys

torch_version, torchvision_version, root = sys.argv[1:]
for name in ("torch", "torchvision", "timm", "ema_pytorch", "torch_ema", "diffusers",
             "matplotlib", "functional_ema"):
    importlib.import_module(name)
assert md.version("torch").split("+")[0] == torch_version, md.version("torch")
assert md.version("torchvision").split("+")[0] == torchvision_version, md.version("torchvision")
import functional_ema

here = pathlib.Path(functional_ema.__file__).resolve()
assert here.is_relative_to(pathlib.Path(root).resolve()), f"functional_ema from {here}"
for dist in ("torch", "torchvision", "timm", "ema-pytorch", "torch-ema", "diffusers",
             "matplotlib", "optree", "functional_ema"):
    print(f"setup_env: {dist:15s} {md.version(dist)}")
PY
}

if [ -z "${FORCE:-}" ] && [ -x "$venv/bin/python" ] && check 2>/dev/null; then
    echo "setup_env: $venv is ready (FORCE=1 to reinstall)."
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "setup_env: creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# torch first and pinned, and the pins repeated below, so no peer's requirement can pull
# another torch in.
"${pip[@]}" install "torch==$torch_version" "torchvision==$torchvision_version"
"${pip[@]}" install \
    "torch==$torch_version" "torchvision==$torchvision_version" \
    timm ema-pytorch torch-ema diffusers matplotlib
"${pip[@]}" install -e "$root"

check
echo "setup_env: ready. Run: $venv/bin/python $here/bench_ema.py"
