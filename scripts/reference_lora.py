#!/usr/bin/env python3
"""PyTorch + PEFT reference for whet's LoRA golden test: one forward/backward step from
identical weights. Loads the default model (GGUF, CPU, float32) with transformers, wraps every
linear layer of every block with PEFT LoRA (r=4, alpha=8), fills each lora_A/lora_B with a
deterministic pattern that tests/ reproduce, and writes tests/fixtures/lora_golden.json: the
masked mean cross-entropy over trained tokens and, for the adapters of layers 0 and 29, the sum
and a few entries of each gradient.

    python3 -m pip install torch transformers gguf accelerate peft
    scripts/fetch-model.sh && python3 scripts/reference_lora.py
"""
import json
import math
import pathlib

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The first chat_golden prompt followed by its greedy answer; the answer part is trained.
IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
       19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
       198, 504, 3575, 282, 4649, 314, 7042, 30, 2]
TRAINED_FROM = 37


def pattern(name, n):
    """Deterministic values for a tensor, from its PEFT name (whet's tests use the same rule)."""
    seed = sum(name.encode()) % 1000
    return [0.02 * math.sin(0.1 * k + seed) for k in range(n)]


def main():
    model = AutoModelForCausalLM.from_pretrained(ROOT / "models", gguf_file=GGUF, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"))
    params = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            key = name.replace(".default.weight", ".weight")
            with torch.no_grad():
                p.copy_(torch.tensor(pattern(key, p.numel()), dtype=torch.float32).reshape(p.shape))
            params[key] = p
    ids = torch.tensor([IDS])
    logits = model(ids).logits[0, :-1]
    targets = ids[0, 1:]
    mask = torch.tensor([1.0 if t >= TRAINED_FROM else 0.0 for t in range(1, len(IDS))])
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    loss = (nll * mask).sum() / mask.sum()
    loss.backward()
    grads = {}
    for key, p in params.items():
        if ".layers.0." in key or ".layers.29." in key:
            g = p.grad.flatten()
            grads[key] = {"sum": g.sum().item(), "abs_sum": g.abs().sum().item(),
                          "first": g[:4].tolist(), "last": g[-4:].tolist()}
    out = {"source": f"scripts/reference_lora.py, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, {GGUF}, cpu float32",
           "ids": IDS, "trained_from": TRAINED_FROM, "r": 4, "lora_alpha": 8, "loss": loss.item(), "grads": grads}
    path = ROOT / "tests" / "fixtures" / "lora_golden.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}: loss {loss.item():.6f}, {len(grads)} gradients")


if __name__ == "__main__":
    main()
