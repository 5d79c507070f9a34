#!/usr/bin/env bash
# SFT alone against SFT + DPO on the house-style example, from the SFT set alone: a short SFT
# run, pairs made of the references (chosen) and that adapter's own answers that break
# data/support-style/rules.toml (rejected) by `whet data pairs --only-failing`, DPO from the SFT
# adapter on them, and `whet compare` of both adapters beside the prompted base. Each phase's
# time is printed at the end. `data/support-style-pairs/` was made by the pairs phase.
# SFT_STEPS (20) and DPO_STEPS (40) set the runs' lengths.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WHET_ROOT"
scripts/fetch-model.sh
step "cargo build --release"
cargo build --release --locked
whet=target/release/whet
out=runs/sft-dpo
mkdir -p "$out/sft-data"
# Pairs from the training and validation splits only: the test split stays unseen.
for f in train.jsonl valid.jsonl rules.toml; do
  ln -sf "$WHET_ROOT/data/support-style/$f" "$out/sft-data/$f"
done
phase sft $whet train --data data/support-style --out "$out/sft" --overwrite \
  --steps "${SFT_STEPS:-20}" --learning-rate 1e-3 --targets all-linear --eval-every 0
phase pairs $whet data pairs "$out/sft-data" --adapter "$out/sft/adapter" --only-failing \
  --max-tokens 80 --out "$out/pairs" --overwrite
# RPO (--rpo-alpha 1: DPO plus the chosen answers' cross-entropy) at a DPO learning rate: plain
# DPO on these pairs, whose chosen and rejected answers share most of their tokens, lowered both
# and collapsed the model (rules 0.000 at --learning-rate 5e-4, 0.095 at 5e-5; measured
# 2026-12-08).
phase dpo $whet train --data "$out/pairs" --objective dpo --init-adapter "$out/sft/adapter" \
  --out "$out/dpo" --overwrite --steps "${DPO_STEPS:-40}" --learning-rate 5e-5 --rpo-alpha 1 \
  --eval-every 20
phase eval $whet eval --adapter "$out/dpo/adapter" --reference-adapter "$out/sft/adapter" \
  --data "$out/pairs/valid.jsonl"
phase compare $whet compare --data data/support-style \
  --adapter sft="$out/sft/adapter" --adapter sft-dpo="$out/dpo/adapter" \
  --system-prompt-file data/support-style/system-prompt.txt --shots 0,3 --seeds 3 \
  --max-tokens 80 --quantize q8_0 --out "$out/compare" --overwrite
phase_times
