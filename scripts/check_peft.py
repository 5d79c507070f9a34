#!/usr/bin/env python3
"""Load a whet adapter with Hugging Face PEFT on the same base model and print the greedy chat
reply, so it can be compared with `whet generate --adapter` (tests/cli/train.rs does); with
`--logits FILE`, also write the prompt's token ids and the logits at its last position as JSON.

    python3 -m pip install torch transformers gguf accelerate peft
    python3 scripts/check_peft.py --adapter runs/style/adapter --prompt "Hi" [--max-tokens 40]
"""
import argparse
import json
import pathlib

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--logits", help="write {ids, logits} of the prompt's last position here")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(ROOT / "models", gguf_file=a.gguf)
    base = AutoModelForCausalLM.from_pretrained(ROOT / "models", gguf_file=a.gguf, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, a.adapter).eval()
    text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        if a.logits:
            logits = model(input_ids=ids).logits[0, -1]
            pathlib.Path(a.logits).write_text(json.dumps({"ids": ids[0].tolist(), "logits": logits.tolist()}))
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_tokens,
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    main()
