"""PyTorch peer of `cargo bench --bench encoder`: the same prepared safetensors,
the same tokenizer.json and messages, the same masked mean pooling, on the
same threads. Prints messages/s per batch size, in f32 and bf16.

    python=$(benches/torch_setup.sh | tail -1)
    $python benches/torch_encoder.py [multilingual-e5-small|all-minilm-l6-v2] [threads]
"""
import os
import sys
import time

import torch
from tokenizers import Tokenizer
from transformers import BertConfig, BertModel

name = sys.argv[1] if len(sys.argv) > 1 else "multilingual-e5-small"
threads = int(sys.argv[2]) if len(sys.argv) > 2 else os.cpu_count()
torch.set_num_threads(threads)
models = os.environ.get("PALAVER_MODELS_DIR", os.path.expanduser("~/.cache/palaver/models"))
d = os.path.join(models, name)
prefix = "query: " if "e5" in name else ""
here = os.path.dirname(os.path.abspath(__file__))
messages = [l for l in open(os.path.join(here, "messages.txt"), encoding="utf-8").read().splitlines() if l]

config = BertConfig.from_json_file(os.path.join(d, "config.json"))
model = BertModel.from_pretrained(d, config=config, add_pooling_layer=False).eval()
tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
tok.no_truncation()


def batch(n):
    texts = [prefix + messages[i % len(messages)] for i in range(n)]
    enc = tok.encode_batch(texts)
    width = max(len(e.ids) for e in enc)
    ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    return ids, mask


def embed(ids, mask):
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(out.dtype)
    pooled = (out * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


print(f"torch {torch.__version__}, {threads} threads, {name}, {len(messages)} messages")
for dtype in ["f32", "bf16"]:
    for n in [1, 8, 32, 128]:
        ids, mask = batch(n)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            embed(ids, mask)  # warm-up
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < 5.0 or runs < 3:
                embed(ids, mask)
                runs += 1
            secs = (time.perf_counter() - start) / runs
        print(f"{dtype} batch {n:>3}: {n / secs:8.1f} messages/s  ({secs * 1e3:.1f} ms per batch)", flush=True)
