#!/usr/bin/env bash
# Throwaway virtualenv with PyTorch and transformers, for the peer measurement
# in benches/torch_encoder.py. Outside the clone; nothing of it ships.
set -euo pipefail
VENV="${PALAVER_TORCH_VENV:-$HOME/.cache/palaver/torch-venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch transformers safetensors tokenizers
"$VENV/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$VENV/bin/python"
