#!/usr/bin/env bash
# whet beside PyTorch + PEFT on one CUDA GPU, after scripts/cuda-smoke.sh: LoRA r8 over a bf16
# base (f32 adapters on both sides), random weights with SmolLM2-135M's shapes at batch 4 x 512
# and 8 x 1024, on q,v and on all linear layers, and with Qwen2.5-1.5B's shapes at 4 x 512;
# tokens/s and peak GPU memory (nvidia-smi) for both, alternated (scripts/bench_compare.py).
# With nsys on the PATH, one whet run is also profiled and its top GPU kernels printed.
#
#   scripts/build-cuda.sh                          # anywhere: target/cuda/release/whet
#   scripts/gpu-bench.sh [WHET_BINARY] [ROUNDS]    # on the GPU machine
#
# Needs there: the NVIDIA driver and nvidia-smi, python3 with torch, transformers and peft, and
# CUDA 13's libcublas/libcublasLt/libcurand/libcudart (from target/cuda-toolkit, PyTorch's own
# nvidia wheels or a CUDA install: each directory found is put on LD_LIBRARY_PATH). The binary
# is 83 MB; `xz -k target/cuda/release/whet` makes it 11 MB to move, and a WHET_BINARY ending in
# .xz is unpacked first. Everything printed is also written to $OUT/gpu-bench.txt when OUT is set.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
whet=${1:-target/cuda/release/whet}
rounds=${2:-2}
[ -f "$whet" ] || { echo "error: $whet not found; build it with scripts/build-cuda.sh" >&2; exit 1; }
if [[ "$whet" == *.xz ]]; then
  unpacked=$(mktemp -d)/whet
  xz -dc "$whet" > "$unpacked"
  chmod +x "$unpacked"
  whet=$unpacked
fi
command -v nvidia-smi > /dev/null || { echo "error: nvidia-smi not found: no NVIDIA driver here" >&2; exit 1; }

# CUDA 13 libraries the binary links, wherever this machine has them.
libs=$(python3 - <<'EOF'
import pathlib, site
roots = [pathlib.Path("target/cuda-toolkit")] + [pathlib.Path(p) for p in site.getsitepackages()]
wanted = {"libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13"}
seen = []
for root in filter(pathlib.Path.exists, roots):
    for f in root.rglob("lib*.so.1*"):  # one walk of each tree for all four
        if f.name in wanted and str(f.parent.resolve()) not in seen:
            seen.append(str(f.parent.resolve()))
print(":".join(seen))
EOF
)
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

log=${OUT:+$OUT/gpu-bench.txt}
exec > >(tee ${log:+"$log"}) 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, peft; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), peft {peft.__version__}")'

echo "== scripts/cuda-smoke.sh"
scripts/cuda-smoke.sh "$whet"

bench() { # ARGS... for bench_compare.py train
  echo "== bench_compare.py train $*"
  python3 scripts/bench_compare.py train --device cuda --dtype bf16 --whet "$whet" \
    --rounds "$rounds" --steps 3 "$@"
}
bench --batch-size 4 --seq-len 512
bench --batch-size 4 --seq-len 512 --targets all-linear
bench --batch-size 8 --seq-len 1024
bench --batch-size 8 --seq-len 1024 --targets all-linear
bench --batch-size 4 --seq-len 512 --preset qwen2.5-1.5b

if command -v nsys > /dev/null; then
  echo "== nsys: whet bench train --device cuda --dtype bf16 --batch-size 4 --seq-len 512"
  report=$(mktemp -d)/whet
  nsys profile --quiet -o "$report" "$whet" bench train --device cuda --dtype bf16 \
    --batch-size 4 --seq-len 512 --steps 3 > /dev/null
  nsys stats --report cuda_gpu_kern_sum --format csv "$report.nsys-rep" | head -25
else
  echo "nsys not found: no profile"
fi
