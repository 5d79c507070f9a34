#!/usr/bin/env python3
"""The PyTorch side of `whet bench generate`: transformers on the same GGUF, CPU, float32,
same prompt length and decode length, median of N runs, with the load average.

    python3 -m pip install torch transformers gguf accelerate
    python3 scripts/bench_generate_torch.py [--threads 2] [--runs 5]
Compare with:
    target/release/whet bench generate --runs 5
"""
import argparse
import os
import pathlib
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(ROOT / "models", gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(ROOT / "models", gguf_file=GGUF, dtype=torch.float32).eval()
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * a.prompt_tokens)[: a.prompt_tokens]
    ids = torch.tensor([ids])
    load_before = os.getloadavg()[0]
    prefill, decode = [], []
    for i in range(a.runs + 1):
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            t1 = time.perf_counter()
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(a.tokens - 1):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
        if i > 0:  # the first run warms up
            prefill.append(a.prompt_tokens / (t1 - t0))
            decode.append((a.tokens - 1) / (t2 - t1))
    print(f"model:      {GGUF} via transformers (torch {torch.__version__}), cpu float32")
    print(f"threads:    {a.threads}")
    print(f"prefill:    {statistics.median(prefill):.1f} tokens/s (median)")
    print(f"decode:     {statistics.median(decode):.1f} tokens/s (median; runs: {', '.join(f'{d:.1f}' for d in decode)})")
    print(f"load avg:   {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1 min)")


if __name__ == "__main__":
    main()
