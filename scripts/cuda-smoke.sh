#!/usr/bin/env bash
# CUDA training smoke test, for a machine with an NVIDIA GPU and its driver: the same LoRA
# training (random weights with SmolLM2-135M's shapes, all-linear r8, 20 steps, same seed) runs on
# the GPU and on the CPU; the GPU's loss must fall, and its adapter must agree with the CPU's
# (float rounding differs between the devices, so within a tolerance, not bit for bit). A bf16
# run on the GPU (bf16 base, f32 adapters and optimizer) must also lower its loss.
#
#   scripts/build-cuda.sh                      # anywhere: builds target/cuda/release/whet
#   scripts/cuda-smoke.sh [WHET_BINARY]        # on the GPU machine; needs python3 (stdlib only)
#
# WHET_SMOKE_DEVICE=cpu runs the "GPU" side on the CPU too, to check the script itself.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
whet=${1:-target/cuda/release/whet}
device=${WHET_SMOKE_DEVICE:-cuda}
[ -x "$whet" ] || { echo "error: $whet not found; build it with scripts/build-cuda.sh" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

train() { # NAME ARGS...
  local name=$1
  shift
  "$whet" train --model random:smollm2-135m --data data/support-style --steps 20 \
    --learning-rate 1e-3 --warmup-steps 0 --targets all-linear --eval-every 0 --seed 1 \
    --max-seq-len 256 --quiet --overwrite --out "$out/$name" "$@"
}

echo "training on $device (f32), on the CPU (f32) and on $device (bf16) ..." >&2
train gpu --device "$device" --dtype f32
train cpu --device cpu --dtype f32
train gpu-bf16 --device "$device" --dtype bf16

python3 - "$out" "$device" <<'EOF'
import json, math, struct, sys
from pathlib import Path

out, device = Path(sys.argv[1]), sys.argv[2]

def losses(run):
    rows = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]

def adapter(run):
    """The adapter's tensors as flat lists (safetensors, f32, read with the standard library)."""
    data = (out / run / "adapter" / "adapter_model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    tensors = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", f"{name}: {t['dtype']}"
        a, b = t["data_offsets"]
        raw = data[8 + n + a:8 + n + b]
        tensors[name] = struct.unpack(f"<{len(raw) // 4}f", raw)
    return tensors

failed = False
def check(ok, what):
    global failed
    print(("ok    " if ok else "FAIL  ") + what)
    failed |= not ok

for run in ["gpu", "gpu-bf16"]:
    l = losses(run)
    check(l[-1] < 0.5 * l[0], f"{device} {run}: loss falls {l[0]:.4f} -> {l[-1]:.4f}")
lg, lc = losses("gpu"), losses("cpu")
check(abs(lg[-1] - lc[-1]) <= 0.02 * lc[-1], f"final loss {device} {lg[-1]:.5f} vs cpu {lc[-1]:.5f}")
g, c = adapter("gpu"), adapter("cpu")
check(g.keys() == c.keys(), f"same {len(c)} adapter tensors")
worst = (next(iter(c)), 0.0)
for name in c:
    diff = math.sqrt(sum((x - y) ** 2 for x, y in zip(g[name], c[name])))
    norm = math.sqrt(sum(y * y for y in c[name]))
    rel = diff / norm if norm > 0 else diff
    worst = max(worst, (name, rel), key=lambda w: w[1])
check(worst[1] <= 0.05, f"adapters agree: worst relative difference {worst[1]:.2e} ({worst[0]})")
sys.exit(1 if failed else 0)
EOF
