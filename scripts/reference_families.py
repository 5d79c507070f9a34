#!/usr/bin/env python3
"""Golden outputs for every model family whet runs, from transformers' own classes.

Builds tiny random checkpoints (2 layers, hidden 64, vocabulary 320, a few hundred KB each)
with `LlamaForCausalLM` (plain, as Llama 2 and TinyLlama; and with llama3 RoPE scaling), `MistralForCausalLM` (sliding window 4, shorter
than the test sequence), `Qwen2ForCausalLM` (q/k/v biases) and `Qwen3ForCausalLM` (q/k norm,
tied head), saves each as a Hugging Face directory under tests/fixtures/families/NAME/ with
whet's byte-level tokenizer, and writes tests/fixtures/families/golden.json: logits at a few
positions, the greedy continuation, and one PEFT LoRA step (r=2, alpha=4, every linear layer,
adapters filled with the pattern below; masked loss and each adapter gradient's sums).
whet's test `every_family_matches_transformers` compares against it.

    python3 -m pip install torch transformers peft safetensors
    python3 scripts/reference_families.py
"""
import json
import math
import pathlib

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/families"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [3, 77, 150, 9, 201, 64, 33, 250, 18, 121, 7, 300]
TRAINED_FROM = 6
SHAPES = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5, initializer_range=0.3, bos_token_id=0, eos_token_id=2)

FAMILIES = {
    # Llama 2 / TinyLlama / SmolLM2: plain RoPE, untied head.
    "llama2": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_theta=10000.0, tie_word_embeddings=False)),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        rope_theta=10000.0, sliding_window=4, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        rope_theta=1000000.0, head_dim=16, attention_bias=False, tie_word_embeddings=True)),
}


def byte_level_tokenizer():
    """whet's built-in byte-level tokenizer (`ModelTokenizer::byte_level`): ChatML specials,
    then the 256 byte symbols in sorted order; plus one merge (" t"), since a GGUF BPE
    vocabulary needs `tokenizer.ggml.merges`."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({c: len(specials) + i for i, c in enumerate(alphabet)})
    vocab["\u0120t"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\u0120", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def pattern(name, n):
    """Deterministic adapter values from the PEFT name (whet's test uses the same rule)."""
    seed = sum(name.encode()) % 1000
    return [0.05 * math.sin(0.1 * k + seed) for k in range(n)]


def run(name, config_cls, model_cls, extra):
    torch.manual_seed(sum(name.encode()))
    config = config_cls(**SHAPES, **extra)
    model = model_cls._from_config(config, attn_implementation="eager").float().eval()
    # Norm weights away from one, so a norm applied to the wrong axis shows.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    byte_level_tokenizer().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    }, indent=1))
    (d / "generation_config.json").unlink(missing_ok=True)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        logits = model(ids).logits[0]
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        greedy = out[0, len(IDS):].tolist()
        # Every greedy choice must be clear of its runner-up, or rounding could flip it.
        seq = out[0].tolist()
        full = model(torch.tensor([seq])).logits[0]
        for t in range(len(IDS) - 1, len(seq) - 1):
            top2 = torch.topk(full[t], 2).values
            assert (top2[0] - top2[1]).item() > 1e-3, f"{name}: near tie at {t}"
    rows = {str(t): logits[t].tolist() for t in (0, 5, len(IDS) - 1)}

    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    params = {}
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            key = n.replace(".default.weight", ".weight")
            with torch.no_grad():
                p.copy_(torch.tensor(pattern(key, p.numel())).reshape(p.shape))
            params[key] = p
    logits = peft_model(ids).logits[0, :-1]
    mask = torch.tensor([1.0 if t >= TRAINED_FROM else 0.0 for t in range(1, len(IDS))])
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    loss = (nll * mask).sum() / mask.sum()
    loss.backward()
    grads = {k: {"sum": p.grad.sum().item(), "abs_sum": p.grad.abs().sum().item(),
                 "first": p.grad.flatten()[:3].tolist()} for k, p in params.items()}
    return {"arch": config.model_type, "logits": rows, "greedy": greedy,
            "lora": {"r": 2, "alpha": 4, "loss": loss.item(), "grads": grads}}


def main():
    golden = {"transformers": transformers.__version__, "torch": torch.__version__,
              "peft": peft.__version__, "ids": IDS, "trained_from": TRAINED_FROM, "families": {}}
    for name, (cc, mc, extra) in FAMILIES.items():
        golden["families"][name] = run(name, cc, mc, extra)
        print(name, golden["families"][name]["greedy"])
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()
