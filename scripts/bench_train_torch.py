#!/usr/bin/env python3
"""The PyTorch + PEFT side of `whet bench train`: a randomly initialised model with
SmolLM2-135M's shapes, LoRA r8 on q_proj,v_proj, batch 4 x 128 tokens (all trained), f32, AdamW,
on the CPU; median tokens/s over the steps after one warm-up step, peak RSS, load average.

    python3 -m pip install torch transformers peft
    python3 scripts/bench_train_torch.py [--threads 2] [--steps 5]
Compare with:
    target/release/whet bench train --steps 5
"""
import argparse
import os
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).float()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    speeds = []
    for step in range(a.steps + 1):
        ids = torch.randint(3, cfg.vocab_size, (a.batch_size, a.seq_len))
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        if step > 0:
            speeds.append(a.batch_size * a.seq_len / (time.perf_counter() - t0))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model:      random SmolLM2-135M shapes, torch {torch.__version__}, PEFT LoRA r8 on q_proj,v_proj")
    print(f"threads:    {a.threads}")
    print(f"train:      {statistics.median(speeds):.1f} tokens/s (median of {len(speeds)} steps after 1 warm-up; "
          + ", ".join(f"{s:.0f}" for s in speeds) + ")")
    print(f"peak RSS:   {peak_mb:.0f} MB")
    print(f"load avg:   {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1 min)")


if __name__ == "__main__":
    main()
