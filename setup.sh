#!/usr/bin/env bash
# Set up python-lfads on a fresh machine:
#   ./setup.sh          folders, .venv, the package and its dependencies, ./data seeded from ./eg_data
#   ./setup.sh --dev    the same plus the test tools, the IBL stack and Ray Tune the tests exercise
#   ./setup.sh --ibl    the same plus the IBL stack (ONE-api, ibllib, iblatlas) for src/ibl/prep.py
#   ./setup.sh --tune   the same plus Ray Tune for src/tune.py (AutoLFADS search)
#   ./setup.sh --nwb    the same plus pynwb for src/prep_nwb.py (NWB files)
#   ./setup.sh --bwb    the same plus safetensors for src/bwb.py (IBL's BrainWideBench)
# Environment: PYTHON picks the interpreter (default python3, 3.10 or newer); TORCH_SPEC picks
# the torch build to install when .venv has none (default: torch from PyPI, e.g. set
# TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" for a CPU-only build).
set -euo pipefail
cd "$(dirname "$0")"

extras=()
for arg in "$@"; do
  case "$arg" in
    --dev) extras+=(dev ibl tune nwb bwb) ;;
    --nwb) extras+=(nwb) ;;
    --ibl) extras+=(ibl) ;;
    --tune) extras+=(tune) ;;
    --bwb) extras+=(bwb) ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (use --dev, --ibl, --tune, --nwb, --bwb)" >&2; exit 2 ;;
  esac
done

mkdir -p data results media
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# torch first and on its own: a build already in .venv (CPU-only, or for a given CUDA) is kept
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086  # TORCH_SPEC may hold several words (a version and an index)
  .venv/bin/python -m pip install ${TORCH_SPEC:-torch}
fi
spec="."
if [ ${#extras[@]} -gt 0 ]; then
  spec=".[$(IFS=,; echo "${extras[*]}")]"
fi
.venv/bin/python -m pip install -e "$spec"
# the tests score with BrainWideBench's own scorer; it pins torch 2.10, so never its dependencies
if [ ${#extras[@]} -gt 0 ] && [[ " ${extras[*]} " == *" dev "* ]]; then
  .venv/bin/python -m pip install --no-deps "ibl-bwb-eval==0.1.0"
fi

# seed ./data with the synthetic example, never overwriting what is there
if ! ls data/*.h5 >/dev/null 2>&1; then
  cp eg_data/*.h5 data/
  echo "seeded ./data with the synthetic example: $(ls data/*.h5)"
fi
echo "ready: .venv/bin/python -m src.main trains on ./data"
