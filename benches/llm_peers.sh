#!/usr/bin/env bash
# Peers for `cargo bench --bench llm`: llama.cpp (its Python binding, built
# from source here with the machine's native flags) and PyTorch + transformers
# (GGUF weights dequantized to bf16), on the same prepared GGUF files, same
# prompt lengths and the same thread count, in a throwaway virtualenv outside
# the clone; then palaver's own rows (`cargo bench --bench llm`, without
# candle stock unless STOCK=1) in the same run, and the ratios of palaver to
# llama.cpp and to the fastest peer per column.
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
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
date -u +"run started %Y-%m-%d %H:%M UTC"
for m in "${MODELS[@]}"; do
    gguf=$(ls "$MODELS_DIR/$m"/*.gguf | head -1)
    "$VENV/bin/python" benches/llm_peers.py --model "$m" --gguf "$gguf" \
        --text ../shared/data/summaries/tweetsumm_train.jsonl \
        --threads "${THREADS:-2}" --runs "${RUNS:-3}" | tee -a "$OUT"
done
IFS=,; PALAVER_LLMS="${MODELS[*]}" STOCK="${STOCK:-0}" RUNS="${RUNS:-3}" RAYON_NUM_THREADS="${THREADS:-2}" \
    cargo bench -q --bench llm 2>/dev/null | tee -a "$OUT"; unset IFS
date -u +"run ended %Y-%m-%d %H:%M UTC"
# Ratios per model and column: palaver / llama.cpp, palaver / fastest peer.
awk -F'|' '
    NF >= 8 && $4 ~ /^ *[0-9.]+ *$/ {
        m = $2; e = $3; gsub(/^ +| +$/, "", m); gsub(/^ +| +$/, "", e)
        for (c = 4; c <= 7; c++) v[m, e, c] = $c + 0
        if (e != "palaver" && e != "candle stock") peers[m, e] = 1
        models[m] = 1
    }
    END {
        print "| model | ratio | prompt 512 | prompt 1,024 | generation short | generation after 1,024 |"
        print "|---|---|---|---|---|---|"
        for (m in models) {
            line1 = "| " m " | palaver / llama.cpp |"; line2 = "| " m " | palaver / fastest peer |"
            for (c = 4; c <= 7; c++) {
                best = 0
                for (k in peers) { split(k, p, SUBSEP); if (p[1] == m && v[m, p[2], c] > best) best = v[m, p[2], c] }
                l = v[m, "llama.cpp", c]
                line1 = line1 sprintf(" %s |", l > 0 ? sprintf("%.2fx", v[m, "palaver", c] / l) : "")
                line2 = line2 sprintf(" %s |", best > 0 ? sprintf("%.2fx", v[m, "palaver", c] / best) : "")
            }
            print line1; print line2
        }
    }' "$OUT"
