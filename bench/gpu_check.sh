#!/usr/bin/env bash
# One-GPU check, at most 8 minutes: MAE ViT-B/16 bf16 images/s + MFU, DINO ViT-S/16 2x224+10x96
# images/s, GPU JPEG decode + crop images/s, data wait as % of step time -> one JSON.
#
#   bench/gpu_check.sh                      # on a machine with one NVIDIA GPU
#   bench/gpu_check.sh --dry                # one step of each part on the CPU (what the test runs)
#   bench/gpu_check.sh --out /tmp/gpu.json
#
# Installs nothing: it uses the interpreter in $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="$(command -v python3)"; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # nothing from the network
exec timeout --signal=TERM --kill-after=10 480 "$py" "$here/gpu_check.py" "$@"
