#!/usr/bin/env bash
# Peers for `cargo bench --bench llm`: llama.cpp (its Python binding, built
# from source here with the machine's native flags) and PyTorch + transformers
# (the GGUF weights in bf16, and in f32), on the same prepared GGUF files, same
# prompt lengths and the same thread count, in a throwaway virtualenv outside
# the clone, and palaver's own rows (`cargo bench --bench llm`, without candle
# stock unless STOCK=1); then the ratios of palaver to llama.cpp and to the
# fastest peer per column.
#
# Engines take turns: each of RUNS rounds measures every engine once, per
# model, and the table takes each engine's median over the rounds. A shared VM
# drifts by 20% and more over minutes; run one engine's repeats back to back
# and the drift lands on one engine's figures.
#
# Rounds take minutes, and within one an engine can land on a slow minute of
# the VM. PAIRED=N measures generation the finer way: llama.cpp and palaver,
# both loaded, take turns generation by generation, N pairs per context, and
# each pair's ratio is printed (benches/llm_peers.py --paired).
#
#   benches/llm_peers.sh                      # both Qwen2.5 models, 2 threads
#   THREADS=2 RUNS=3 benches/llm_peers.sh qwen2.5-coder-0.5b-instruct
#   PAIRED=20 benches/llm_peers.sh            # generation only, in pairs
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
cargo bench -q --bench llm --no-run 2>/dev/null
if [ -n "${PAIRED:-}" ]; then
    # llama.cpp logs to stderr; it is shown only when the run fails, where it
    # holds the reason (a palaver child that died is named there).
    ERR=$(mktemp)
    trap 'rm -f "$OUT" "$ERR"' EXIT
    for m in "${MODELS[@]}"; do
        gguf=$(ls "$MODELS_DIR/$m"/*.gguf | head -1)
        if ! "$VENV/bin/python" benches/llm_peers.py --model "$m" --gguf "$gguf" \
            --text ../shared/data/summaries/tweetsumm_train.jsonl \
            --threads "${THREADS:-2}" --paired "$PAIRED" 2>"$ERR" | grep '^|'; then
            tail -n 20 "$ERR" >&2
            exit 1
        fi
    done
    date -u +"run ended %Y-%m-%d %H:%M UTC"
    exit 0
fi
for m in "${MODELS[@]}"; do
    gguf=$(ls "$MODELS_DIR/$m"/*.gguf | head -1)
    for round in $(seq "${RUNS:-3}"); do
        echo "round $round of ${RUNS:-3}, $m"
        "$VENV/bin/python" benches/llm_peers.py --model "$m" --gguf "$gguf" \
            --text ../shared/data/summaries/tweetsumm_train.jsonl \
            --threads "${THREADS:-2}" --runs 1 2>/dev/null | tee -a "$OUT"
        PALAVER_LLMS="$m" STOCK="${STOCK:-0}" RUNS=1 RAYON_NUM_THREADS="${THREADS:-2}" \
            cargo bench -q --bench llm 2>/dev/null | grep '^| .* | [0-9.]* |' | tee -a "$OUT"
    done
done
date -u +"run ended %Y-%m-%d %H:%M UTC"
# Each engine's median over the rounds, then per model and column the ratios
# palaver / llama.cpp and palaver / fastest peer.
awk -F'|' '
    function median(m, e, c,    n, i, j, t, a) {
        n = cnt[m, e, c]
        for (i = 1; i <= n; i++) a[i] = v[m, e, c, i]
        for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
        return n == 0 ? 0 : (n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2)
    }
    NF >= 8 && $4 ~ /^ *[0-9.]+ *$/ {
        m = $2; e = $3; gsub(/^ +| +$/, "", m); gsub(/^ +| +$/, "", e)
        for (c = 4; c <= 7; c++) v[m, e, c, ++cnt[m, e, c]] = $c + 0
        engines[m, e] = 1
        if (e != "palaver" && e != "candle stock") peers[m, e] = 1
        models[m] = 1
    }
    END {
        print "| model | engine (median of rounds) | prompt 512 | prompt 1,024 | generation short | generation after 1,024 |"
        print "|---|---|---|---|---|---|"
        for (k in engines) {
            split(k, p, SUBSEP)
            line = "| " p[1] " | " p[2] " |"
            for (c = 4; c <= 7; c++) { med[p[1], p[2], c] = median(p[1], p[2], c); line = line sprintf(" %.1f |", med[p[1], p[2], c]) }
            print line | "sort"
        }
        close("sort")
        for (m in models) {
            line1 = "| " m " | palaver / llama.cpp |"; line2 = "| " m " | palaver / fastest peer |"
            for (c = 4; c <= 7; c++) {
                best = 0
                for (k in peers) { split(k, p, SUBSEP); if (p[1] == m && med[m, p[2], c] > best) best = med[m, p[2], c] }
                l = med[m, "llama.cpp", c]
                line1 = line1 sprintf(" %s |", l > 0 ? sprintf("%.2fx", med[m, "palaver", c] / l) : "")
                line2 = line2 sprintf(" %s |", best > 0 ? sprintf("%.2fx", med[m, "palaver", c] / best) : "")
            }
            print line1; print line2
        }
    }' "$OUT"
