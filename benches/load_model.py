#!/usr/bin/env python3
"""A cost model of the model thread under a burst of summaries, to weigh
scheduling policies without running them.

A pass over the 1.5B summarizer on 2 cores costs about FIX + ROW * rows ms
(BENCHMARKS.md, "The previous note checked with the grown prompt": 1 row
35.9 ms, 5 rows 59.2, 81 rows 583, 145 rows 1,012, 256 rows 1,588 after
1,200 tokens of context). `CLIENTS` threads of `PROMPT` new prompt tokens
arrive at once and each writes `ANSWER` tokens. Two policies:

- share: what `BatchPolicy` does: prompt chunks of 256 rows, and while notes
  are being written they get `share` of the time in decode passes of their
  own (one row each);
- mixed: every pass carries the generating sequences' rows plus prompt rows
  of the oldest thread up to a budget of rows (chunked prefill riding with
  decode steps), so no pass is spent on a handful of rows.

Prints wall, p50 and p95 / solo latency for each, and the bound no order of
passes can beat: the last of a burst cannot finish before every prompt has
been read.

  python3 benches/load_model.py
  ROW_MS=1.4 python3 benches/load_model.py   # prompt rows 4x cheaper (AMX, a GPU)
"""
import os
import statistics

FIX = float(os.environ.get("FIX_MS", 30.0))  # ms per pass
ROW = float(os.environ.get("ROW_MS", 5.6))  # ms per row
CLIENTS = int(os.environ.get("CLIENTS", 8))
PROMPT = int(os.environ.get("PROMPT", 1040))
ANSWER = int(os.environ.get("ANSWER", 105))
CHUNK = 256


def cost(rows):
    return FIX + ROW * rows


def burst(policy, n, share=0.5, budget=32):
    left, out, done = [PROMPT] * n, [0] * n, [None] * n
    t, owed = 0.0, 0.0
    while None in done:
        reading = [i for i in range(n) if left[i] > 0]
        writing = [i for i in range(n) if left[i] == 0 and done[i] is None]
        prompt_rows, decode = 0, False
        if policy == "share":
            if reading and (not writing or owed <= 0):
                prompt_rows = min(CHUNK, left[reading[0]])
            else:
                decode = True
        else:
            decode = bool(writing)
            if reading:
                room = max(budget - len(writing), 4) if writing else CHUNK
                prompt_rows = min(room, left[reading[0]])
        c = cost(prompt_rows + (len(writing) if decode else 0))
        t += c
        if policy == "share":
            owed = owed + c * share / (1 - share) if prompt_rows and writing else max(0.0, owed - c)
        if decode:
            for i in writing:
                out[i] += 1
        if prompt_rows:
            i = reading[0]
            left[i] -= prompt_rows
            out[i] += left[i] == 0  # the prompt's last pass gives the first token
        for i in range(n):
            if done[i] is None and left[i] == 0 and out[i] >= ANSWER:
                done[i] = t
    done.sort()
    return done[-1] / 1e3, statistics.median(done) / 1e3, done[-1] / 1e3


def main():
    solo = burst("share", 1)[0]
    print(f"{CLIENTS} threads of {PROMPT} prompt tokens, {ANSWER}-token notes; solo {solo:.1f} s")
    print("| policy | wall (s) | p50 (s) | p95 / solo |")
    print("|---|---|---|---|")
    for share in (0.5, 0.2, 0.0):
        wall, p50, p95 = burst("share", CLIENTS, share=share)
        print(f"| decode share {share} | {wall:.1f} | {p50:.1f} | {p95 / solo:.2f}x |")
    for budget in (16, 32, 64, 128):
        wall, p50, p95 = burst("mixed", CLIENTS, budget=budget)
        print(f"| mixed, {budget} rows a pass | {wall:.1f} | {p50:.1f} | {p95 / solo:.2f}x |")
    bound = CLIENTS * PROMPT * ROW / 1e3
    print(f"| bound: every prompt read, nothing else | {bound:.1f} | | {bound / solo:.2f}x |")


if __name__ == "__main__":
    main()
