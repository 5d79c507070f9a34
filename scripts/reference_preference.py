#!/usr/bin/env python3
"""TRL reference for whet's preference objectives (DPO, Robust DPO, IPO, SimPO, ORPO, KTO).

On the tiny random Llama and Qwen2 checkpoints of tests/fixtures/families/ (made by
scripts/reference_families.py) with PEFT LoRA r=2, alpha=4 on every linear layer (lora_A filled
with the pattern whet's test reproduces, lora_B zero, as a fresh adapter is), it tokenizes and
collates the pairs of tests/fixtures/preference/pairs.jsonl as TRL's DPOTrainer does, and
records, for each objective: the loss, TRL's logged metrics and every LoRA gradient at step 0,
then the same after three AdamW steps (torch.optim.AdamW, lr 5e-3, gradient norm clipped to 1),
into tests/fixtures/preference/golden.json.

The losses are TRL's own code: `DPOTrainer.compute_loss` (loss_type sigmoid, robust, ipo) and,
on the same collated batch, `CPOTrainer.cpo_loss` (loss_type simpo, cpo_alpha 0) and
`ORPOTrainer.odds_ratio_loss` with ORPO's chosen cross-entropy; KTO is `KTOTrainer.compute_loss`
on the unpaired answers of tests/fixtures/preference/unpaired.jsonl, one batch of all of them
(so TRL's rotation of answers within a batch for the KL estimate is whet's), with the mismatched
sequences it collates recorded too. whet reads a string prompt as
one user turn and a string answer as one assistant turn (rendered through the chat template,
as its prompt/completion format is); TRL is handed those records as messages.

    .venv/bin/python -m pip install trl   # with torch, transformers, peft (scripts/test.sh)
    .venv/bin/python scripts/reference_preference.py
"""
import json
import math
import pathlib
import types

import peft
import torch
import torch.nn.functional as F
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests/fixtures"
OUT = FIXTURES / "preference"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, STEPS, CLIP = 5e-3, 3, 1.0

# The three record forms whet reads: strings, messages with a system turn, and whole
# conversations whose shared start is the prompt.
PAIRS = [
    {"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "no"},
    {"system": "Answer in one word.",
     "prompt": [{"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris"}],
     "rejected": [{"role": "assistant", "content": "It is a city in Europe called Lyon."}]},
    {"chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there!"}],
     "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Go away."}]},
]

# KTO's unpaired answers: strings and messages, a system turn, both labels.
UNPAIRED = [
    {"prompt": "Is the sky blue?", "completion": "Yes, on a clear day.", "label": True},
    {"prompt": "Is the sky blue?", "completion": "no", "label": False},
    {"system": "Answer in one word.", "prompt": [{"role": "user", "content": "Capital of France?"}],
     "completion": [{"role": "assistant", "content": "Paris"}], "label": True},
    {"prompt": [{"role": "user", "content": "Say hi"}],
     "completion": [{"role": "assistant", "content": "Go away, I am busy."}], "label": False},
]

KTO = [
    ("kto", {"objective": "kto", "beta": 0.1}, {"beta": 0.1}),
    ("kto_weighted", {"objective": "kto", "beta": 0.3, "desirable_weight": 1.5, "undesirable_weight": 0.7},
     {"beta": 0.3, "desirable_weight": 1.5, "undesirable_weight": 0.7}),
]

# (name, whet's settings, how TRL computes it)
OBJECTIVES = [
    ("dpo", {"objective": "dpo", "beta": 0.1}, ("dpo", {"loss_type": "sigmoid", "beta": 0.1})),
    ("robust_dpo", {"objective": "dpo", "beta": 0.2, "label_smoothing": 0.1},
     ("dpo", {"loss_type": "robust", "beta": 0.2, "label_smoothing": 0.1})),
    ("ipo", {"objective": "ipo", "beta": 0.1}, ("dpo", {"loss_type": "ipo", "beta": 0.1})),
    # RPO: DPO plus the chosen answers' cross-entropy (TRL's "sft" loss, a mean over every
    # chosen token of the batch), weighted.
    ("rpo", {"objective": "dpo", "beta": 0.1, "rpo_alpha": 0.5},
     ("dpo", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.1})),
    ("simpo", {"objective": "simpo", "beta": 2.0, "simpo_gamma": 0.5},
     ("simpo", {"beta": 2.0, "simpo_gamma": 0.5})),
    ("orpo", {"objective": "orpo", "beta": 0.1}, ("orpo", {"beta": 0.1})),
]


def pattern(name, n):
    """Deterministic adapter values from the PEFT name (whet's test uses the same rule)."""
    seed = sum(name.encode()) % 1000
    return [0.05 * math.sin(0.1 * k + seed) for k in range(n)]


def as_messages(rec):
    """A whet record as TRL's conversational form."""
    msg = lambda role, x: [{"role": role, "content": x}] if isinstance(x, str) else x
    if "prompt" in rec:
        prompt, chosen, rejected = msg("user", rec["prompt"]), msg("assistant", rec["chosen"]), msg("assistant", rec["rejected"])
    else:
        prompt, chosen, rejected = rec["chosen"][:-1], rec["chosen"][-1:], rec["rejected"][-1:]
    if "system" in rec:
        prompt = [{"role": "system", "content": rec["system"]}] + prompt
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def kto_messages(rec):
    """A whet unpaired record as TRL's conversational form."""
    msg = lambda role, x: [{"role": role, "content": x}] if isinstance(x, str) else x
    prompt = msg("user", rec["prompt"])
    if "system" in rec:
        prompt = [{"role": "system", "content": rec["system"]}] + prompt
    return {"prompt": prompt, "completion": msg("assistant", rec["completion"]), "label": rec["label"]}


def reset(params):
    with torch.no_grad():
        for key, p in params.items():
            if "lora_A" in key:
                p.copy_(torch.tensor(pattern(key, p.numel())).reshape(p.shape))
            else:
                p.zero_()
        for p in params.values():
            p.grad = None


def summary(params):
    return {k: {"sum": p.grad.sum().item(), "abs_sum": p.grad.abs().sum().item(),
                "first": p.grad.flatten()[:3].tolist()} for k, p in params.items()}


def run_family(name):
    d = FIXTURES / "families" / name
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(d)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    params = {n.replace(".default.weight", ".weight"): p for n, p in model.named_parameters() if "lora_" in n}
    data = Dataset.from_list([as_messages(r) for r in PAIRS])
    out = {"objectives": {}}
    for obj_name, whet_settings, (kind, trl_settings) in OBJECTIVES:
        reset(params)
        dpo_args = {k: v for k, v in trl_settings.items() if kind == "dpo"}
        args = DPOConfig(output_dir="/tmp/whet-trl-reference", report_to="none",
                         per_device_train_batch_size=len(PAIRS), max_length=None,
                         use_cpu=True, **dpo_args)
        # Given a PEFT model, DPOTrainer keeps a frozen copy of its adapter, "ref", as the
        # reference: with lora_B zero that is the base model, whet's reference (adapters off).
        if "ref" in model.peft_config:
            model.delete_adapter("ref")
        trainer = DPOTrainer(model=model, args=args, processing_class=tok, train_dataset=data)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
        if "batch" not in out:
            n = len(PAIRS)
            out["batch"] = {
                "chosen_ids": [row[: int(a.sum())].tolist() for row, a in zip(batch["input_ids"][:n], batch["attention_mask"][:n])],
                "chosen_mask": [m[: int(a.sum())].tolist() for m, a in zip(batch["completion_mask"][:n], batch["attention_mask"][:n])],
                "rejected_ids": [row[: int(a.sum())].tolist() for row, a in zip(batch["input_ids"][n:], batch["attention_mask"][n:])],
                "rejected_mask": [m[: int(a.sum())].tolist() for m, a in zip(batch["completion_mask"][n:], batch["attention_mask"][n:])],
            }

        def loss_and_metrics():
            model.train()
            if kind == "dpo":
                trainer._metrics["train"].clear()
                loss = trainer.compute_loss(model, batch)
                metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()
                           if k.startswith(("rewards/", "logps/"))}
                return loss, metrics
            n = len(PAIRS)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
            c, r = logps[:n], logps[n:]
            ns = types.SimpleNamespace(accelerator=types.SimpleNamespace(device=torch.device("cpu")),
                                       beta=trl_settings["beta"], label_smoothing=0.0, alpha=0.0,
                                       loss_type="simpo", simpo_gamma=trl_settings.get("simpo_gamma"))
            if kind == "simpo":
                losses, cr, rr = CPOTrainer.cpo_loss(ns, c, r)
                loss, extra = losses.mean(), {}
            else:
                losses, cr, rr, ratio, log_odds = ORPOTrainer.odds_ratio_loss(ns, c, r)
                nll = F.cross_entropy(logits[:n, :-1].reshape(-1, logits.size(-1)), labels[:n, 1:].reshape(-1),
                                      ignore_index=-100)
                loss = nll - losses.mean()
                extra = {"nll_loss": nll.item(), "log_odds_ratio": ratio.item(), "log_odds_chosen": log_odds.item()}
            metrics = {"rewards/chosen": cr.mean().item(), "rewards/rejected": rr.mean().item(),
                       "rewards/accuracies": (cr > rr).float().mean().item(),
                       "rewards/margins": (cr - rr).mean().item(),
                       "logps/chosen": c.mean().item(), "logps/rejected": r.mean().item(), **extra}
            return loss, metrics

        record = {"settings": whet_settings, "trl": {"kind": kind, **trl_settings}}
        opt = torch.optim.AdamW(list(params.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        for step in range(STEPS + 1):
            for p in params.values():
                p.grad = None
            loss, metrics = loss_and_metrics()
            loss.backward()
            if step in (0, STEPS):
                record[f"step{step}"] = {"loss": loss.item(), "metrics": metrics, "grads": summary(params)}
            if step < STEPS:
                torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)
                opt.step()
        out["objectives"][obj_name] = record
        print(name, obj_name, record["step0"]["loss"], record[f"step{STEPS}"]["loss"])

    kto_data = Dataset.from_list([kto_messages(r) for r in UNPAIRED])
    out["kto"] = {}
    for obj_name, whet_settings, trl_settings in KTO:
        reset(params)
        args = KTOConfig(output_dir="/tmp/whet-trl-reference", report_to="none",
                         per_device_train_batch_size=len(UNPAIRED), max_length=None,
                         use_cpu=True, **trl_settings)
        if "ref" in model.peft_config:
            model.delete_adapter("ref")
        trainer = KTOTrainer(model=model, args=args, processing_class=tok, train_dataset=kto_data)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(UNPAIRED))])
        if "kto_batch" not in out:
            rows = lambda key, mask: [row[: int(a.sum())].tolist() for row, a in zip(batch[key], batch[mask])]
            out["kto_batch"] = {
                "ids": rows("input_ids", "attention_mask"),
                "mask": rows("completion_mask", "attention_mask"),
                "kl_ids": rows("KL_input_ids", "KL_attention_mask"),
                "kl_mask": rows("KL_completion_mask", "KL_attention_mask"),
                "label": batch["label"].tolist(),
            }
        record = {"settings": whet_settings, "trl": {"kind": "kto", **trl_settings}}
        opt = torch.optim.AdamW(list(params.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        for step in range(STEPS + 1):
            for p in params.values():
                p.grad = None
            model.train()
            trainer._metrics["train"].clear()
            loss = trainer.compute_loss(model, batch)
            metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()
                       if k.startswith(("rewards/", "logps/")) or k == "kl"}
            loss.backward()
            if step in (0, STEPS):
                record[f"step{step}"] = {"loss": loss.item(), "metrics": metrics, "grads": summary(params)}
            if step < STEPS:
                torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)
                opt.step()
        out["kto"][obj_name] = record
        print(name, obj_name, record["step0"]["loss"], record[f"step{STEPS}"]["loss"])
    return out


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    (OUT / "unpaired.jsonl").write_text("".join(json.dumps(r) + "\n" for r in UNPAIRED))
    golden = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
              "peft": peft.__version__, "lr": LR, "steps": STEPS, "max_grad_norm": CLIP, "families": {}}
    for name in ["llama2", "qwen2"]:
        golden["families"][name] = run_family(name)
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()
