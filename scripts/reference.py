#!/usr/bin/env python3
"""PyTorch reference for whet's golden tests.

Loads the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) with Hugging Face
transformers on the CPU in float32 -- transformers dequantizes the GGUF and
un-permutes q/k exactly as whet does -- and writes, under tests/fixtures/:

  tokenizer_golden.json  token ids of every string in tokenizer_corpus.json
  chat_golden.json       for every conversation in chat_conversations.json:
                         the rendered prompt (add_generation_prompt=True), its
                         ids, the top-k last-position logits and the greedy
                         continuation
  data_golden.json       for every training conversation in
                         data_conversations.json: the rendered text
                         (add_generation_prompt=False) and its ids

Run it after changing either input file:
    python3 -m pip install torch transformers gguf accelerate
    scripts/fetch-model.sh
    python3 scripts/reference.py
"""
import json
import pathlib
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MODEL_DIR = ROOT / "models"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOP_K = 20
GREEDY_STEPS = 24


def main():
    if not (MODEL_DIR / GGUF).exists():
        sys.exit(f"error: {MODEL_DIR / GGUF} is missing\nhint: run scripts/fetch-model.sh")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=GGUF, dtype=torch.float32)
    model.eval()

    corpus = json.loads((FIXTURES / "tokenizer_corpus.json").read_text())
    tokens = [
        {"text": text, "ids": tok.encode(text, add_special_tokens=False)} for text in corpus
    ]
    write("tokenizer_golden.json", {"source": source(), "cases": tokens})

    conversations = json.loads((FIXTURES / "chat_conversations.json").read_text())
    cases = []
    for messages in conversations:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
            top = torch.topk(logits, TOP_K)
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=GREEDY_STEPS,
                do_sample=False,
                eos_token_id=None,  # always GREEDY_STEPS tokens, even past <|im_end|>
                pad_token_id=tok.eos_token_id,
            )[0, len(ids):]
        cases.append(
            {
                "messages": messages,
                "rendered": text,
                "ids": ids,
                "top_ids": top.indices.tolist(),
                "top_logits": top.values.tolist(),
                "greedy_ids": out.tolist(),
                "greedy_text": tok.decode(out),
            }
        )
    write("chat_golden.json", {"source": source(), "cases": cases})

    conversations = json.loads((FIXTURES / "data_conversations.json").read_text())
    data = []
    for messages in conversations:
        text = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        data.append({"messages": messages, "rendered": text, "ids": tok.encode(text, add_special_tokens=False)})
    write("data_golden.json", {"source": source(), "cases": data})


def source():
    return f"scripts/reference.py, torch {torch.__version__}, transformers {transformers.__version__}, {GGUF}, cpu float32"


def write(name, obj):
    path = FIXTURES / name
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
