#!/usr/bin/env bash
# whet's main job, end to end on a fresh machine with Rust and Python 3 + pip:
# fetch the default model, build whet, ask it a question, fine-tune it on the house-style
# example dataset for a few minutes on the CPU, show the adapter's effect, and measure it
# against a well-prompted base on the held-out test set (`whet compare`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-model.sh
cargo build --release --locked
whet=target/release/whet
say() { printf '\n\033[1m%s\033[0m\n' "$*" >&2; }

say '$ whet generate --chat --prompt "What is the capital of France?"'
$whet generate --chat --prompt "What is the capital of France?"

say '$ whet train --data data/support-style --out runs/quickstart ...   (a few minutes on 2 CPU cores)'
$whet train --data data/support-style --out runs/quickstart --overwrite \
  --steps 60 --learning-rate 1e-3 --targets all-linear --eval-every 20

question="Where is my order FJ-12345? I ordered a rain jacket last week."
say "The base model, asked: $question"
$whet generate --chat --max-tokens 80 --prompt "$question"
say "The fine-tuned model (runs/quickstart/adapter), same question:"
$whet generate --chat --max-tokens 80 --adapter runs/quickstart/adapter --prompt "$question"

say '$ whet compare --data data/support-style --adapter runs/quickstart/adapter ...   (fine-tuned against prompted, on test.jsonl)'
$whet compare --data data/support-style --adapter runs/quickstart/adapter \
  --system-prompt-file data/support-style/system-prompt.txt --shots 0,3 --seeds 3 \
  --max-tokens 80 --out runs/quickstart-compare
