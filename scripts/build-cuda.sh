#!/usr/bin/env bash
# Build whet with CUDA support on a machine with no GPU and no CUDA install.
#
# The CUDA 13.0 toolkit comes from NVIDIA's PyPI wheels, unpacked into one tree; the driver
# library (libcuda.so.1, installed with the NVIDIA driver) is replaced at link time by a stub
# exporting the driver functions cudarc calls. Where it runs, the binary (about 75 MB) needs the
# real driver, and libcublas.so.13 (with libcublasLt.so.13), libcurand.so.10 and libcudart.so.13
# from the same wheels or a CUDA 13 install.
#
#   scripts/build-cuda.sh            # -> target/cuda/release/whet, for compute capability 9.0
#   CUDA_COMPUTE_CAP=89 scripts/build-cuda.sh
#   scripts/build-cuda.sh --features nccl   # + data-parallel training over MPI with NCCL
#
# `--features nccl` also fetches NCCL (PyPI nvidia-nccl-cu13) and needs OpenMPI and libclang
# here (apt install libopenmpi-dev libclang-dev); where it runs, libnccl.so.2
# (target/cuda-toolkit/nvidia/nccl/lib) and OpenMPI's libmpi.so.40 must be found too. That
# build took 36 CPU-minutes (89 minutes beside other jobs) on 2 cores, 2026-12-01.
#
# Environment: CUDA_COMPUTE_CAP (default 90: H100/H200), WHET_CUDA_TOOLKIT (where the toolkit
# is unpacked, default target/cuda-toolkit), PYTHON (default python3). A cold build took about
# 22 minutes on 2 AVX2 cores (most of it nvcc compiling candle's kernels), and 13 minutes (780 s,
# wheels included) on 2 Zen 5 cores on 2026-12-02. To run the binary on
# a GPU machine: LD_LIBRARY_PATH=target/cuda-toolkit/nvidia/cu13/lib target/cuda/release/whet
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(dirname "$0")/.."

FEATURES=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --features) FEATURES="$FEATURES,${2:?--features needs a value}"; shift 2 ;;
        --features=*) FEATURES="$FEATURES,${1#--features=}"; shift ;;
        *) echo "error: unknown argument \`$1\`; expected --features LIST" >&2; exit 1 ;;
    esac
done

PYTHON=${PYTHON:-python3}
TOOLKIT=${WHET_CUDA_TOOLKIT:-$PWD/target/cuda-toolkit}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
WHEELS=(
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
    nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
)
CUDA=$TOOLKIT/nvidia/cu13

if [ ! -x "$CUDA/bin/nvcc" ]; then
    echo "fetching the CUDA 13.0 toolkit wheels from PyPI ..." >&2
    download=$(mktemp -d)
    trap 'rm -rf "$download"' EXIT
    "$PYTHON" -m pip download --quiet --no-deps --dest "$download" "${WHEELS[@]}"
    mkdir -p "$TOOLKIT"
    for wheel in "$download"/*.whl; do
        "$PYTHON" -m zipfile -e "$wheel" "$TOOLKIT"
    done
    # Wheels do not keep file modes.
    chmod +x "$CUDA"/bin/* "$CUDA"/nvvm/bin/*
    # The linker looks for unversioned names (libcublas.so); the wheels ship libcublas.so.13.
    for lib in "$CUDA"/lib/lib*.so.*; do
        base=${lib%%.so.*}.so
        [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
    done
    ln -sfn lib "$CUDA/lib64"
fi

NCCL=$TOOLKIT/nvidia/nccl
if [[ ",$FEATURES," == *",nccl,"* && ! -e "$NCCL/lib/libnccl.so" ]]; then
    echo "fetching NCCL from PyPI ..." >&2
    download=$(mktemp -d)
    "$PYTHON" -m pip download --quiet --no-deps --dest "$download" nvidia-nccl-cu13==2.32.3
    "$PYTHON" -m zipfile -e "$download"/nvidia_nccl_cu13-*.whl "$TOOLKIT"
    rm -rf "$download"
    ln -sfn libnccl.so.2 "$NCCL/lib/libnccl.so"
fi

# A stub libcuda.so with every driver function cudarc's bindings declare. Linking against it
# records `libcuda.so.1` as needed; at run time the driver's own library is loaded instead.
if [ ! -e "$CUDA/lib/stubs/libcuda.so" ]; then
    echo "writing the libcuda.so link stub ..." >&2
    cargo fetch --locked --quiet
    bindings=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*/cudarc-0.19.*/src/driver/sys/mod.rs' | sort | tail -1)
    [ -n "$bindings" ] || { echo "error: cudarc's driver bindings not found after cargo fetch" >&2; exit 1; }
    mkdir -p "$CUDA/lib/stubs"
    sed -n 's/^ *fn \(cu[A-Za-z0-9_]*\)(.*/void \1(void) {}/p' "$bindings" | sort -u > "$CUDA/lib/stubs/libcuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA/lib/stubs/libcuda.so" "$CUDA/lib/stubs/libcuda.c"
fi

export CUDA_HOME=$CUDA CUDA_PATH=$CUDA PATH=$CUDA/bin:$PATH
export LIBRARY_PATH=$CUDA/lib/stubs:$CUDA/lib:$NCCL/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$CUDA/lib/stubs"
cargo build --release --locked --features "$FEATURES" --target-dir target/cuda
echo "built target/cuda/release/whet (features $FEATURES, compute capability $CUDA_COMPUTE_CAP)" >&2
