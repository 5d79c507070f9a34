#!/usr/bin/env python3
"""TRL's side of `whet bench train --objective dpo`: TRL's own `DPOTrainer.compute_loss` (its
concatenated chosen + rejected forward, the reference pass through the frozen copy of the PEFT
adapter it keeps, the sigmoid loss) on random pairs, with a randomly initialised model of
SmolLM2-135M's shapes, PEFT LoRA r8 on q_proj,v_proj (or --targets), f32, torch AdamW, on the CPU;
median tokens/s (both sides' tokens) over the steps after one warm-up step, peak RSS, load
average. A pair is a prompt of --prompt-tokens shared by two answers, each side --seq-len tokens,
as whet's random pairs. Denormals are flushed, as scripts/bench_train_torch.py does.

    .venv/bin/python -m pip install trl   # with torch, transformers, peft (scripts/test.sh)
    .venv/bin/python scripts/bench_dpo_trl.py --threads 2 --batch-size 2 --seq-len 128 --prompt-tokens 64
Compare with:
    target/release/whet bench train --objective dpo --batch-size 2 --seq-len 128 --prompt-tokens 64
    target/release/whet bench train --objective sft --batch-size 4 --seq-len 128 --prompt-tokens 64
(the SFT step over the same number of rows' tokens, for the DPO/SFT step cost).
"""
import argparse
import os
import pathlib
import resource
import statistics
import time

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens of each side")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--targets", default="q_proj,v_proj")
    a = ap.parse_args()
    flushed = torch.set_flush_denormal(True)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    cfg = LlamaConfig(**SMOLLM2)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    targets = "all-linear" if a.targets == "all-linear" else a.targets.split(",")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    # DPOTrainer wants a tokenizer and a dataset to start; the batches below are whet's random
    # pairs, collated as its collator would (input_ids of chosen then rejected rows).
    tok = AutoTokenizer.from_pretrained(ROOT / "tests/fixtures/families/llama3")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    args = DPOConfig(output_dir="/tmp/whet-bench-dpo", report_to="none", use_cpu=True,
                     per_device_train_batch_size=a.batch_size, max_length=None, learning_rate=2e-4)
    trainer = DPOTrainer(model=model, args=args, processing_class=tok, train_dataset=data)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=2e-4)
    b, t, p = a.batch_size, a.seq_len, a.prompt_tokens
    speeds = []
    for step in range(a.steps + 1):
        prompt = torch.randint(3, cfg.vocab_size, (b, p))
        sides = [torch.cat([prompt, torch.randint(3, cfg.vocab_size, (b, t - p))], 1) for _ in range(2)]
        ids = torch.cat(sides, 0)
        completion = torch.zeros_like(ids)
        completion[:, p:] = 1
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}
        t0 = time.perf_counter()
        model.train()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad()
        if step > 0:
            speeds.append(ids.numel() / (time.perf_counter() - t0))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import trl
    print(f"model:      random smollm2-135m shapes, torch {torch.__version__}, TRL {trl.__version__} DPOTrainer "
          f"(sigmoid), PEFT LoRA r8 on {a.targets}, f32 on cpu")
    print(f"pairs:      {b} a step, {t} tokens a side, the first {p} the prompt")
    print(f"threads:    {a.threads}; denormals {'flushed' if flushed else 'kept'}")
    print(f"train:      {statistics.median(speeds):.1f} tokens/s (median of {len(speeds)} steps after 1 warm-up; "
          + ", ".join(f"{s:.0f}" for s in speeds) + ")")
    print(f"peak RSS:   {peak_mb:.0f} MB")
    print(f"load avg:   {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1 min)")


if __name__ == "__main__":
    main()
