#!/usr/bin/env python3
"""The PyTorch + PEFT side of `whet bench train`: a randomly initialised model with
SmolLM2-135M's shapes, LoRA r8 on q_proj,v_proj (or --targets), batch 4 x 128 tokens (all
trained), f32, AdamW, on the CPU (or --device cuda, --dtype bf16); median tokens/s over the steps
after one warm-up step, peak RSS (and on a GPU the peak of PyTorch's allocator), load average.
Denormal floats are flushed to zero (--keep-denormals leaves PyTorch's default).

    python3 -m pip install torch transformers peft
    python3 scripts/bench_train_torch.py [--threads 2] [--steps 5] [--targets all-linear]
    python3 scripts/bench_train_torch.py --device cuda --dtype bf16 --batch-size 4 --seq-len 512
Compare with:
    target/release/whet bench train --steps 5
    target/cuda/release/whet bench train --device cuda --dtype bf16 --batch-size 4 --seq-len 512

--dtype bf16 holds the base model in bf16 and, as whet's `--dtype bf16`, the LoRA weights and
AdamW's state in f32 (PEFT's `autocast_adapter_dtype`, on by default).

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
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

# whet's random presets (`random:NAME`), the same shapes.
PRESETS = {
    "smollm2-135m": (LlamaConfig, LlamaForCausalLM, dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)),
    "qwen2.5-1.5b": (Qwen2Config, Qwen2ForCausalLM, dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)),
}


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
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m",
                    help="the shapes (random weights), as whet's random:NAME")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="the base model's")
    ap.add_argument("--keep-denormals", action="store_true",
                    help="leave PyTorch's denormal arithmetic on (its default); flushing them is "
                         "worth about 14%% to PyTorch on random weights")
    a = ap.parse_args()
    # Random weights make denormal floats in PyTorch's CPU path: with them kept its steps ran
    # 165-170 tokens/s against 188-194 flushed (alternated, AMD EPYC Zen 3, 2 threads,
    # 2026-12-07). whet's kernels do not slow on them, so the peer flushes by default, as a
    # tuned PyTorch run would.
    flushed = torch.set_flush_denormal(not a.keep_denormals) and not a.keep_denormals
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: this PyTorch sees no CUDA GPU "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    batches = [json.loads(line)["rows"] for line in open(a.rows)] if a.rows else None
    if batches is not None and len(batches) < a.steps + 1:
        raise SystemExit(f"error: {a.rows} has {len(batches)} batches, --steps {a.steps} needs {a.steps + 1}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    config, model_class, shapes = PRESETS[a.preset]
    cfg = config(**shapes)
    model = model_class(cfg).to(device, {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype])
    targets = "all-linear" if a.targets == "all-linear" else a.targets.split(",")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trained), "LoRA weights in f32, as whet's"
    opt = torch.optim.AdamW(trained, lr=2e-4)
    speeds = []
    for step in range(a.steps + 1):
        if batches is None:
            ids = torch.randint(3, cfg.vocab_size, (a.batch_size, a.seq_len))
            inputs, tokens = {"input_ids": ids, "labels": ids}, ids.numel()
        else:
            inputs, tokens = batch_inputs(batches[step])
        inputs = {k: v.to(device) for k, v in inputs.items()}
        sync()
        t0 = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad()
        sync()
        if step > 0:
            speeds.append(tokens / (time.perf_counter() - t0))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model:      random {a.preset} shapes, torch {torch.__version__}, PEFT LoRA r8 on {a.targets}, "
          f"{a.dtype} base on {a.device}")
    if batches is not None:
        print(f"rows:       {a.rows}")
    print(f"threads:    {a.threads}; denormals {'flushed' if flushed else 'kept'}")
    print(f"train:      {statistics.median(speeds):.1f} tokens/s (median of {len(speeds)} steps after 1 warm-up; "
          + ", ".join(f"{s:.0f}" for s in speeds) + ")")
    print(f"peak RSS:   {peak_mb:.0f} MB")
    if a.device == "cuda":
        print(f"peak GPU:   {torch.cuda.max_memory_allocated() / 2**20:.0f} MB allocated by PyTorch "
              f"({torch.cuda.max_memory_reserved() / 2**20:.0f} MB reserved), {torch.cuda.get_device_name()}")
    print(f"load avg:   {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1 min)")


if __name__ == "__main__":
    main()
