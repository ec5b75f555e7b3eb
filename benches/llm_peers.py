"""Peer measurements for benches/llm.rs: the same four numbers (prompt 512 and
1,024 tokens/s; 64 generated tokens/s after 16 and after 1,024 tokens of
context), greedy, for llama.cpp and PyTorch on one GGUF file.

With --paired N, generation only: llama.cpp and palaver (`PAIRED=1 cargo bench
--bench llm`, a child process) both keep the model loaded and take turns, one
64-token generation each, N pairs per context, the first of each pair
alternating; each pair's ratio is of two runs seconds apart, so the VM's drift
over minutes falls on both engines alike."""
import argparse
import os
import shlex
import statistics
import subprocess
import time


def tokens_of(text_path, tokenize):
    with open(text_path, encoding="utf-8") as f:
        text = f.read(400_000)
    ids = tokenize(text)
    assert len(ids) >= 1100, len(ids)
    return ids[:1100]


def llama_cpp(args):
    from llama_cpp import Llama

    # The binding keeps n_batch rows of logits and writes the last token's at its
    # position: n_batch must cover the whole context used here.
    llm = Llama(model_path=args.gguf, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=2048, n_ubatch=1024, logits_all=False, verbose=False)
    ids = tokens_of(args.text, lambda t: llm.tokenize(t.encode("utf-8"), add_bos=False, special=False))

    def prompt(n):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:n])
        return n / (time.perf_counter() - t)

    def generate(ctx):
        llm.reset()
        llm.eval(ids[:ctx])
        t = time.perf_counter()
        for _ in range(64):
            nxt = int(llm.scores[llm.n_tokens - 1].argmax())
            llm.eval([nxt])
        return 64 / (time.perf_counter() - t)

    if args.paired:
        return paired(args, generate)
    return measure(prompt, generate, args.runs)


def paired(args, peer_generate):
    """Generations of llama.cpp and palaver taking turns (see the module's doc)."""
    env = dict(os.environ, PALAVER_LLMS=args.model, PAIRED="1", STOCK="0", RAYON_NUM_THREADS=str(args.threads))
    own = subprocess.Popen(shlex.split(args.palaver), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    while own.stdout.readline().strip() != "ready":
        if own.poll() is not None:
            raise RuntimeError(f"palaver exited with {own.returncode} before it was ready")

    def own_generate(ctx):
        own.stdin.write(f"{ctx}\n")
        line = own.stdout.readline()
        if not line:
            raise RuntimeError(f"palaver exited with {own.wait()} during a generation after {ctx} tokens")
        return float(line)

    peer_generate(16)  # warm-up, as palaver's
    rows = []
    for ctx, label in ((16, "short"), (1024, "after 1,024")):
        ratios, ours, theirs = [], [], []
        for i in range(args.paired):
            if i % 2 == 0:
                a, b = own_generate(ctx), peer_generate(ctx)
            else:
                b, a = peer_generate(ctx), own_generate(ctx)
            ours.append(a)
            theirs.append(b)
            ratios.append(a / b)
        wins = sum(r > 1 for r in ratios)
        rows.append(f"| {args.model} | generation {label}, {args.paired} pairs | palaver {statistics.median(ours):.1f} "
                    f"| llama.cpp {statistics.median(theirs):.1f} | palaver / llama.cpp: median {statistics.median(ratios):.3f}x, "
                    f"palaver faster in {wins} of {len(ratios)} | pairs: {' '.join(f'{r:.2f}' for r in ratios)} |")
    own.stdin.close()
    own.wait()
    return rows


def torch_bf16(args):
    import torch

    return torch_run(args, torch.bfloat16)


def torch_f32(args):
    # transformers 5 advises f32 for GGUF files; measured too, so that the
    # fastest PyTorch setting is the peer. On the AVX-512 BF16 CPU of
    # BENCHMARKS.md it ran at half the bf16 speed.
    import torch

    return torch_run(args, torch.float32)


def torch_run(args, dtype):
    import os
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    d, f = os.path.split(args.gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype).eval()
    ids = tokens_of(args.text, lambda t: tok(t, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def prompt(n):
        x = torch.tensor([ids[:n]])
        t = time.perf_counter()
        model(x, use_cache=True, logits_to_keep=1)
        return n / (time.perf_counter() - t)

    @torch.inference_mode()
    def generate(ctx):
        out = model(torch.tensor([ids[:ctx]]), use_cache=True, logits_to_keep=1)
        past, logits = out.past_key_values, out.logits[0, -1]
        t = time.perf_counter()
        for _ in range(64):
            nxt = int(logits.argmax())
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
        return 64 / (time.perf_counter() - t)

    return measure(prompt, generate, args.runs)


def measure(prompt, generate, runs):
    prompt(64)  # warm-up
    med = lambda f, a: statistics.median(f(a) for _ in range(runs))
    return [med(prompt, 512), med(prompt, 1024), med(generate, 16), med(generate, 1024)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--gguf", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--engines", default="llama.cpp,pytorch-bf16,pytorch-f32")
    p.add_argument("--paired", type=int, default=0, help="N: llama.cpp and palaver taking turns, N generations each per context")
    p.add_argument("--palaver", default="cargo bench -q --bench llm",
                   help="the command line that runs benches/llm.rs (for --paired)")
    args = p.parse_args()
    if args.paired:
        for row in llama_cpp(args):
            print(row, flush=True)
        return
    for engine in args.engines.split(","):
        fn = {"llama.cpp": llama_cpp, "pytorch-bf16": torch_bf16, "pytorch-f32": torch_f32}[engine]
        try:
            s = fn(args)
            print(f"| {args.model} | {engine} | " + " | ".join(f"{v:.1f}" for v in s) + " |", flush=True)
        except Exception as e:  # one peer failing must not hide the other
            print(f"| {args.model} | {engine} | failed: {type(e).__name__}: {e} | | | |", flush=True)


if __name__ == "__main__":
    main()
