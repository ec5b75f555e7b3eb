#!/usr/bin/env bash
# The encoder against PyTorch in one run: PyTorch + transformers on the same
# prepared safetensors (f32 and bf16, benches/torch_encoder.py), then
# palaver's int8 forward pass (`cargo bench --bench encoder`), then PyTorch
# again, since this class of shared VM drifts by tens of percent within
# minutes; the ratios use the mean of the two PyTorch runs.
#
#   benches/encoder_peers.sh                       # multilingual-e5-small, 2 threads
#   THREADS=2 benches/encoder_peers.sh all-minilm-l6-v2
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-multilingual-e5-small}"
THREADS="${THREADS:-2}"
PY=$(benches/torch_setup.sh | tail -1)
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
date -u +"run started %Y-%m-%d %H:%M UTC"
"$PY" benches/torch_encoder.py "$MODEL" "$THREADS" 2>/dev/null | tee -a "$OUT"
PALAVER_BENCH_ENCODER="$MODEL" RAYON_NUM_THREADS="$THREADS" cargo bench -q --bench encoder -- Int8 2>/dev/null \
    | awk '/^encode\//{name=$1} /thrpt:/ && name != "" {v=$4; if ($5 ~ /^K/) v*=1000; split(name, p, "/"); sub("batch", "", p[4]); printf "palaver int8 batch %4d: %8.1f messages/s\n", p[4], v; name=""}' \
    | tee -a "$OUT"
"$PY" benches/torch_encoder.py "$MODEL" "$THREADS" 2>/dev/null | tee -a "$OUT"
date -u +"run ended %Y-%m-%d %H:%M UTC"
awk '
    /^(f32|bf16) batch/ { b = $3 + 0; v = $4 + 0; sum[$1, b] += v; n[$1, b]++ }
    /^palaver int8 batch/ { ours[$4 + 0] = $5 + 0 }
    END {
        print "\n| batch | palaver int8 | PyTorch f32 | PyTorch bf16 | int8 / f32 | int8 / bf16 |"
        print "|---|---|---|---|---|---|"
        split("1 8 32 128", bs, " ")
        for (i = 1; i <= 4; i++) {
            b = bs[i]; f = sum["f32", b] / n["f32", b]; h = sum["bf16", b] / n["bf16", b]
            printf "| %d | %.1f | %.1f | %.1f | %.2f | %.2f |\n", b, ours[b], f, h, ours[b] / f, ours[b] / h
        }
    }' "$OUT"
