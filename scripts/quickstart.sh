#!/usr/bin/env bash
# whet's main job, end to end on a fresh machine with Rust and Python 3 + pip:
# fetch the default model, build whet, ask it a question, fine-tune it on the house-style
# example dataset for a few minutes on the CPU, show the adapter's effect, and measure it
# against a well-prompted base on the held-out test set (`whet compare`). Each phase's time is
# printed at the end.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WHET_ROOT"
say() { printf '\n\033[1m%s\033[0m\n' "$*" >&2; }

phase fetch scripts/fetch-model.sh
phase build cargo build --release --locked
whet=target/release/whet

say '$ whet generate --chat --prompt "What is the capital of France?"'
phase generate $whet generate --chat --prompt "What is the capital of France?"

say '$ whet train --data data/support-style --out runs/quickstart ...   (a few minutes on 2 CPU cores)'
phase train $whet train --data data/support-style --out runs/quickstart --overwrite \
  --steps 60 --learning-rate 1e-3 --targets all-linear --eval-every 20

question="Where is my order FJ-12345? I ordered a rain jacket last week."
say "The base model, asked: $question"
$whet generate --chat --max-tokens 80 --prompt "$question"
say "The fine-tuned model (runs/quickstart/adapter), same question:"
$whet generate --chat --max-tokens 80 --adapter runs/quickstart/adapter --prompt "$question"

# Every arm decodes on the same q8_0-quantized base (the adapter stays f32): 2-3x faster on a
# CPU than f32, and as fair, since no arm is favoured.
say '$ whet compare --data data/support-style --adapter runs/quickstart/adapter --quantize q8_0 ...   (fine-tuned against prompted, on test.jsonl)'
phase compare $whet compare --data data/support-style --adapter runs/quickstart/adapter \
  --system-prompt-file data/support-style/system-prompt.txt --shots 0,3 --seeds 3 \
  --max-tokens 80 --quantize q8_0 --out runs/quickstart-compare --overwrite

phase_times
