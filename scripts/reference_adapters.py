#!/usr/bin/env python3
"""PEFT adapters written by PEFT itself, for whet's adapter reader, and their outputs.

On the tiny Llama fixture (tests/fixtures/families/llama3, from scripts/reference_families.py),
PEFT makes LoRA adapters with random non-zero A and B (`init_lora_weights=False`) that use the
adapter_config.json fields which change the computation:

  patterns  rank_pattern and alpha_pattern (a short name and a full path), use_rslora
  regex     target_modules as a regular expression
  layers    layers_to_transform with layers_pattern, exclude_modules
  dora      use_dora (whet refuses it by name)
  saved     modules_to_save (refused)

and writes tests/fixtures/adapters/NAME/ plus tests/fixtures/adapters/golden.json: for each
adapter whet must read, the logits at a few positions and 8 greedy tokens. The test
`peft_adapters_load_as_peft_computes_them` compares.

    python3 -m pip install torch transformers peft safetensors
    python3 scripts/reference_adapters.py
"""
import json
import pathlib
import shutil

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE = ROOT / "tests/fixtures/families/llama3"
OUT = ROOT / "tests/fixtures/adapters"
IDS = [3, 77, 150, 9, 201, 64, 33, 250, 18, 121, 7, 300]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ADAPTERS = {
    "patterns": dict(r=4, lora_alpha=8, target_modules=ALL, use_rslora=True,
                     rank_pattern={"v_proj": 6, "model.layers.1.mlp.down_proj": 2},
                     alpha_pattern={"o_proj": 3.0}),
    "regex": dict(r=3, lora_alpha=5, target_modules=r".*\.(q_proj|gate_proj)"),
    "layers": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"],
                   layers_to_transform=[1], layers_pattern="layers",
                   exclude_modules=["model.layers.1.self_attn.v_proj"]),
    "dora": dict(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True),
    "saved": dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
}
REFUSED = {"dora", "saved"}


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    golden = {"peft": peft.__version__, "transformers": transformers.__version__, "ids": IDS, "adapters": {}}
    ids = torch.tensor([IDS])
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        base = transformers.AutoModelForCausalLM.from_pretrained(BASE, attn_implementation="eager").float().eval()
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kw))
        model.eval()
        model.save_pretrained(OUT / name)
        if name in REFUSED:
            continue
        with torch.no_grad():
            logits = model(ids).logits[0]
            out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        golden["adapters"][name] = {
            "logits": {str(t): logits[t].tolist() for t in (0, 11)},
            "greedy": out[0, len(IDS):].tolist(),
            "wrapped": sorted(n for n, _ in model.named_modules() if n.endswith(tuple(ALL)) and hasattr(_, "lora_A")),
        }
        print(name, golden["adapters"][name]["greedy"], len(golden["adapters"][name]["wrapped"]))
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()
