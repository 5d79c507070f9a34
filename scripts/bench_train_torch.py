#!/usr/bin/env python3
"""The PyTorch + PEFT side of `whet bench train`: a randomly initialised model with
SmolLM2-135M's shapes, LoRA r8 on q_proj,v_proj (or --targets), batch 4 x 128 tokens (all
trained), f32, AdamW, on the CPU; median tokens/s over the steps after one warm-up step, peak
RSS, load average.

    python3 -m pip install torch transformers peft
    python3 scripts/bench_train_torch.py [--threads 2] [--steps 5] [--targets all-linear]
Compare with:
    target/release/whet bench train --steps 5

With --rows FILE (written by `whet bench train --data DIR [--pack] --save-rows FILE`) it trains
on whet's own micro-batches instead, one per step: each batch right-padded to its longest row,
labels -100 where whet's loss mask is 0 and on padding (the way TRL trains on completions only:
the head still runs on every position), packed examples kept apart by a block-diagonal causal
mask and their own position ids. tokens/s counts the rows' tokens, padding excluded, as whet's.
"""
import argparse
import json
import os
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def batch_inputs(rows):
    """Model inputs for one of whet's micro-batches, and its number of tokens."""
    t = max(len(r["ids"]) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    labels = torch.full((len(rows), t), -100, dtype=torch.long)
    pos = torch.zeros(len(rows), t, dtype=torch.long)
    seg = torch.full((len(rows), t), -1, dtype=torch.long)  # -1: padding
    for i, r in enumerate(rows):
        n = len(r["ids"])
        ids[i, :n] = torch.tensor(r["ids"])
        mask = torch.tensor(r["mask"], dtype=torch.bool)
        labels[i, :n] = torch.where(mask, ids[i, :n], -100)
        pos[i, :n] = torch.tensor(r["positions"])
        seg[i, :n] = torch.cumsum(pos[i, :n] == 0, 0)
    # Query q sees key k in the same example at or before it; a padding query sees itself only
    # (a row with no key would make softmax's NaN, and padding has no label).
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    allowed = (same & causal) | torch.eye(t, dtype=torch.bool)
    inputs = {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": allowed[:, None]}
    return inputs, int((seg >= 0).sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--targets", default="q_proj,v_proj",
                    help="comma-separated module names, or all-linear (as whet's)")
    ap.add_argument("--rows", help="micro-batches from `whet bench train --save-rows`")
    a = ap.parse_args()
    batches = [json.loads(line)["rows"] for line in open(a.rows)] if a.rows else None
    if batches is not None and len(batches) < a.steps + 1:
        raise SystemExit(f"error: {a.rows} has {len(batches)} batches, --steps {a.steps} needs {a.steps + 1}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).float()
    targets = "all-linear" if a.targets == "all-linear" else a.targets.split(",")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    speeds = []
    for step in range(a.steps + 1):
        if batches is None:
            ids = torch.randint(3, cfg.vocab_size, (a.batch_size, a.seq_len))
            inputs, tokens = {"input_ids": ids, "labels": ids}, ids.numel()
        else:
            inputs, tokens = batch_inputs(batches[step])
        t0 = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        if step > 0:
            speeds.append(tokens / (time.perf_counter() - t0))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model:      random SmolLM2-135M shapes, torch {torch.__version__}, PEFT LoRA r8 on {a.targets}")
    if batches is not None:
        print(f"rows:       {a.rows}")
    print(f"threads:    {a.threads}")
    print(f"train:      {statistics.median(speeds):.1f} tokens/s (median of {len(speeds)} steps after 1 warm-up; "
          + ", ".join(f"{s:.0f}" for s in speeds) + ")")
    print(f"peak RSS:   {peak_mb:.0f} MB")
    print(f"load avg:   {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1 min)")


if __name__ == "__main__":
    main()
