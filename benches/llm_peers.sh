#!/usr/bin/env bash
# Peers for `cargo bench --bench llm`: llama.cpp (its Python binding, built
# from source here with the machine's native flags) and PyTorch + transformers
# (GGUF weights dequantized to bf16), on the same prepared GGUF files, same
# prompt lengths and the same thread count, in a throwaway virtualenv outside
# the clone. Prints a table in the format of the llm bench.
#
#   benches/llm_peers.sh                      # both Qwen2.5 models, 2 threads
#   THREADS=2 RUNS=3 benches/llm_peers.sh qwen2.5-coder-0.5b-instruct
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PALAVER_PEERS_VENV:-$HOME/.cache/palaver/peers-venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if ! "$VENV/bin/python" -c "import llama_cpp, torch, transformers, gguf" 2>/dev/null; then
    "$VENV/bin/pip" install -q --upgrade pip
    # CPU-only torch; llama.cpp compiled for this CPU (GGML_NATIVE).
    "$VENV/bin/pip" install -q torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
        || "$VENV/bin/pip" install -q torch
    "$VENV/bin/pip" install -q transformers gguf sentencepiece accelerate
    CMAKE_ARGS="-DGGML_NATIVE=ON" "$VENV/bin/pip" install -q --no-binary llama-cpp-python llama-cpp-python
fi
MODELS_DIR="${PALAVER_MODELS_DIR:-$HOME/.cache/palaver/models}"
MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || MODELS=(qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct)
for m in "${MODELS[@]}"; do
    gguf=$(ls "$MODELS_DIR/$m"/*.gguf | head -1)
    "$VENV/bin/python" benches/llm_peers.py --model "$m" --gguf "$gguf" \
        --text ../shared/data/summaries/tweetsumm_train.jsonl \
        --threads "${THREADS:-2}" --runs "${RUNS:-3}"
done
