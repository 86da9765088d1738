#!/usr/bin/env bash
# Build a virtual environment that runs lfads-torch from YOUR checkout of it, as a measuring
# stick for `python -m src.bench panel --reference` (docs/panel.md).
#
#     git clone https://github.com/arsedler9/lfads-torch ~/lfads-torch
#     bench/lfads_torch/setup.sh ~/lfads-torch [VENV]      # VENV default: bench/lfads_torch/.venv
#
# Nothing of lfads-torch is copied into this repository: the checkout is installed in place
# (`pip install -e`), without its own pinned requirements (torch 1.13, Lightning 1.6 and ray,
# which no longer install on current Python). The pins below are the newest releases its code
# still runs on: pytorch-lightning 1.9.5 is the last with `trainer.supporters.CombinedLoader`,
# which its data module imports, and numpy < 2 is what that Lightning was built against.
set -euo pipefail

if [ $# -lt 1 ] || [ ! -f "$1/lfads_torch/model.py" ]; then
    echo "usage: $0 LFADS_TORCH_CHECKOUT [VENV]" >&2
    echo "  LFADS_TORCH_CHECKOUT: a clone of https://github.com/arsedler9/lfads-torch" >&2
    echo "  (no lfads_torch/model.py under '${1:-}')" >&2
    exit 2
fi
checkout=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
venv=${2:-$here/.venv}
python=${PYTHON:-python3}

"$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
# torch's metadata needs setuptools >= 77; Lightning 1.9 imports pkg_resources, gone from 81 on
$pip install --upgrade pip "setuptools>=77,<81" wheel
# the CPU build of torch; set TORCH_SPEC for another (e.g. a CUDA build)
$pip install ${TORCH_SPEC:-torch==2.13.0}
$pip install "numpy<2" "pytorch-lightning==1.9.5" hydra-core torchmetrics scikit-learn h5py
$pip install --no-deps -e "$checkout"
"$venv/bin/python" -c "import lfads_torch.model, lfads_torch.datamodules; print('lfads-torch OK')"
echo "lfads-torch environment ready: $venv (checkout $checkout," \
     "commit $(git -C "$checkout" rev-parse --short HEAD 2>/dev/null || echo unknown))"
