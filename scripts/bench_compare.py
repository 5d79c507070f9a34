#!/usr/bin/env python3
"""whet beside PyTorch on the same benchmark, runs alternated, medians and the ratio printed.

    cargo build --release
    python3 -m pip install torch transformers gguf accelerate peft
    python3 scripts/bench_compare.py train [--rounds 3] [--steps 5]
    python3 scripts/bench_compare.py train --targets all-linear --batch-size 1 --seq-len 512
    python3 scripts/bench_compare.py train --data data/support-style --pack --seq-len 512
    python3 scripts/bench_compare.py generate [--rounds 3] [--whet-args "--quantize q8_0"]
    scripts/build-llama-cpp.sh
    python3 scripts/bench_compare.py generate --peer llama.cpp --whet-args "--quantize q4_0"
    cargo build --release --no-default-features --target-dir target/avx2
    python3 scripts/bench_compare.py train --isa avx2
    python3 scripts/bench_compare.py train --preset qwen2.5-1.5b --batch-size 1 --steps 2
    python3 scripts/bench_compare.py train --objective dpo --batch-size 2 --prompt-tokens 64
    scripts/build-cuda.sh    # then, on the GPU machine:
    python3 scripts/bench_compare.py train --device cuda --dtype bf16 --batch-size 4 --seq-len 512

`train --objective dpo` runs `whet bench train --objective dpo` on random pairs (--batch-size
pairs, each side --seq-len tokens, the first --prompt-tokens shared) beside TRL's DPOTrainer
(scripts/bench_dpo_trl.py), and two more whet sides: the same with --precompute-ref, and SFT on
twice the rows (the same chosen + rejected tokens, the same prompt masked), for the cost of a
DPO step against an SFT step over the same tokens.
`train` runs `whet bench train` and scripts/bench_train_torch.py (PyTorch + PEFT, LoRA r8 on
q,v, batch 4 x 128, f32; --targets, --batch-size and --seq-len go to both). With --data DIR
[--pack] whet trains on the dataset's train split with the default GGUF's tokenizer and
template (its weights have the shapes the PyTorch side builds), writes the micro-batches it
ran, and PyTorch trains on those same batches (`--rows`); `generate` runs `whet bench generate` and
scripts/bench_generate_torch.py (transformers on the default GGUF); `generate --peer llama.cpp`
runs llama.cpp's `llama-bench` instead, on the same GGUF with the same prompt and generated
lengths (128 and 64) and threads. Each round runs whet, then the peer, so that a change in the
machine's load hits both; the load average is printed with the
figures. The machines are shared and noisy: compare medians over rounds, not single runs.
`--isa avx2` measures an AVX2 machine on an AVX-512 one: whet built without its AVX-512
kernels (`--no-default-features`, in target/avx2), PyTorch with ATen, MKL and oneDNN held to
AVX2. The CPU's SIMD flags are printed with the figures.
`--device cuda` trains on the GPU on both sides (whet from target/cuda, built by
scripts/build-cuda.sh, or --whet PATH); each run's peak GPU memory is what nvidia-smi reports
in use on the GPU while it runs, above what was in use before it started (the same measure for
both engines: PyTorch's allocator keeps what it reserved, candle's frees).
"""
import argparse
import json
import os
import pathlib
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading

ROOT = pathlib.Path(__file__).resolve().parent.parent
WHET = ROOT / "target" / "release" / "whet"
WHET_AVX2 = ROOT / "target" / "avx2" / "release" / "whet"
WHET_CUDA = ROOT / "target" / "cuda" / "release" / "whet"
# What holds PyTorch's kernels to AVX2 (ATen's own, MKL's GEMMs, oneDNN's).
TORCH_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
              "ONEDNN_MAX_CPU_ISA": "AVX2"}
LLAMA_BENCH = ROOT / "models" / "llama.cpp" / "build" / "bin" / "llama-bench"
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# What each side prints, as "label:  <number> ..." lines.
FIELDS = {
    "train": {"tokens/s": r"^train:\s+([\d.]+)", "peak MB": r"^peak RSS:\s+([\d.]+)"},
    "train-gpu": {"tokens/s": r"^train:\s+([\d.]+)", "peak GPU MB": r"^peak GPU MB:\s+([\d.]+)"},
    "generate": {"prefill tok/s": r"^prefill:\s+([\d.]+)", "decode tok/s": r"^decode:\s+([\d.]+)"},
}
LOAD = r"^load avg:\s+([\d.]+) before, ([\d.]+) after"


def run(cmd, env=None, gpu=False):
    """Run `cmd` (with `env` added to the environment), return its stdout and stderr, and with
    `gpu` a `peak GPU MB:` line after them; stop with its output if it fails."""
    sampler = GpuMemory() if gpu else None
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
    out, err = p.communicate()
    peak = sampler.stop() if sampler else None
    if p.returncode != 0:
        sys.exit(f"error: `{shlex.join(cmd)}` failed:\n{out}{err}")
    return out + err + (f"\npeak GPU MB: {peak:.0f}\n" if gpu else "")


NVIDIA_SMI = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]


def gpu_memory_used():
    """MB in use on each GPU, as nvidia-smi reports it; raises OSError or ValueError where it
    cannot be read."""
    p = subprocess.run(NVIDIA_SMI, capture_output=True, text=True)
    if p.returncode != 0:
        raise OSError(f"exit status {p.returncode}: {p.stderr.strip()}")
    return [float(x) for x in p.stdout.split()]


class GpuMemory:
    """The most GPU memory in use (summed over the GPUs) while a run lasts, above what was in use
    when it started: nvidia-smi polled every 0.1 s on a thread of its own."""

    def __init__(self):
        self.base = sum(gpu_memory_used())
        self.peak = self.base
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        while not self.done.wait(0.1):
            try:
                self.peak = max(self.peak, sum(gpu_memory_used()))
            except (OSError, ValueError):
                pass  # a sample missed; the first one (in main) showed nvidia-smi works

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.peak - self.base


def parse(out, fields, cmd):
    """The fields' numbers and the load averages in one run's output."""
    values = {}
    for name, pattern in list(fields.items()) + [("load", LOAD)]:
        m = re.search(pattern, out, re.MULTILINE)
        if not m:
            sys.exit(f"error: no `{name}` line in the output of `{shlex.join(cmd)}`:\n{out}")
        values[name] = tuple(float(g) for g in m.groups()) if name == "load" else float(m.group(1))
    return values


def llama_bench(cmd):
    """Prefill and decode tokens/s from `llama-bench -o json`, with the load average around it
    (llama-bench prints none)."""
    before = os.getloadavg()[0]
    out = run(cmd)
    after = os.getloadavg()[0]
    start = out.find("[")
    if start < 0:
        sys.exit(f"error: no JSON in the output of `{shlex.join(cmd)}`:\n{out}")
    tests = json.loads(out[start:out.rfind("]") + 1])
    pp = [t["avg_ts"] for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0]
    tg = [t["avg_ts"] for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0]
    if not pp or not tg:
        sys.exit(f"error: llama-bench reported no prefill or no decode test:\n{out}")
    return {"prefill tok/s": pp[0], "decode tok/s": tg[0], "load": (before, after)}


def simd_flags():
    """The x86 SIMD flags of this CPU that decide which kernels run, as /proc/cpuinfo lists
    them ("" where it cannot be read)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    m = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    have = set(m.group(1).split()) if m else set()
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni"]
    return " ".join(f for f in wanted if f in have)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", choices=["train", "generate"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="train: optimizer steps per run")
    ap.add_argument("--runs", type=int, default=5, help="generate: generations per run")
    ap.add_argument("--python", default=sys.executable, help="a Python with torch (and peft)")
    ap.add_argument("--whet-args", default="", help="more flags for `whet bench ...`")
    ap.add_argument("--torch-args", default="", help="more flags for the PyTorch script")
    ap.add_argument("--peer", choices=["torch", "llama.cpp"], default="torch",
                    help="generate: what whet runs beside (llama.cpp: llama-bench)")
    ap.add_argument("--llama-bench", default=str(LLAMA_BENCH),
                    help="llama-bench, built by scripts/build-llama-cpp.sh")
    ap.add_argument("--targets", help="train: LoRA targets on both sides (default q_proj,v_proj)")
    ap.add_argument("--batch-size", type=int, help="train: rows per step on both sides")
    ap.add_argument("--seq-len", type=int, help="train: tokens per row on both sides")
    ap.add_argument("--data", help="train: a dataset directory both sides train on")
    ap.add_argument("--pack", action="store_true", help="train: pack --data's examples")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: both sides held to AVX2 kernels (whet from target/avx2)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="train: where both sides train (cuda: whet from target/cuda)")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                    help="train: the base model's dtype on both sides (LoRA weights stay f32)")
    ap.add_argument("--preset", choices=["smollm2-135m", "qwen2.5-1.5b"],
                    help="train: the shapes both sides build with random weights (whet's "
                    "random:NAME; default smollm2-135m)")
    ap.add_argument("--objective", choices=["sft", "dpo"], default="sft",
                    help="train: dpo runs whet's DPO beside TRL's DPOTrainer")
    ap.add_argument("--prompt-tokens", type=int, default=64,
                    help="train --objective dpo: the prompt tokens a pair's sides share")
    ap.add_argument("--whet", help="the whet binary (default: target/release, avx2 or cuda)")
    a = ap.parse_args()
    if a.bench != "train" and (a.device != "cpu" or a.dtype != "f32"):
        sys.exit("error: --device and --dtype are train's; `generate` runs on the CPU in f32")
    if a.device == "cuda" and a.isa != "native":
        sys.exit("error: --isa avx2 holds CPU kernels to AVX2; it means nothing with --device cuda")
    if a.isa == "avx2" and a.bench == "generate" and a.peer != "torch":
        sys.exit("error: --isa avx2 holds PyTorch to AVX2, not llama.cpp, whose build picks its "
                 "kernels; compare with --peer torch")
    if a.whet:
        whet, build = pathlib.Path(a.whet), None
    elif a.device == "cuda":
        whet, build = WHET_CUDA, "scripts/build-cuda.sh"
    elif a.isa == "avx2":
        whet, build = WHET_AVX2, "cargo build --release --no-default-features --target-dir target/avx2"
    else:
        whet, build = WHET, "cargo build --release"
    if not whet.exists():
        sys.exit(f"error: {whet} not found" + (f"; build it first: {build}" if build else ""))
    if a.device == "cuda":
        try:
            gpu_memory_used()
        except (OSError, ValueError) as e:
            sys.exit(f"error: `{shlex.join(NVIDIA_SMI)}` failed ({e}); --device cuda measures "
                     "GPU memory with it")
    if a.rounds < 1:
        sys.exit(f"error: --rounds must be at least 1, got {a.rounds}")
    count = ["--steps", str(a.steps)] if a.bench == "train" else ["--runs", str(a.runs)]
    peer = a.peer if a.bench == "generate" else "torch"
    both, whet_only, torch_only = [], [], []
    if a.bench == "train":
        for flag, value in [("--targets", a.targets), ("--batch-size", a.batch_size),
                            ("--seq-len", a.seq_len), ("--device", a.device),
                            ("--dtype", a.dtype)]:
            if value is not None:
                both += [flag, str(value)]
        if a.pack and not a.data:
            sys.exit("error: --pack needs --data")
        if a.preset and a.data:
            sys.exit("error: --data trains the default GGUF's shapes; drop --preset")
        if a.preset:
            whet_only, torch_only = ["--model", f"random:{a.preset}"], ["--preset", a.preset]
        if a.data:
            if not MODEL.exists():
                sys.exit(f"error: --data tokenizes with {MODEL}; fetch it: scripts/fetch-model.sh")
            rows = pathlib.Path(tempfile.mkdtemp(prefix="whet-bench-")) / "rows.jsonl"
            whet_only = ["--model", str(MODEL), "--data", a.data, "--save-rows", str(rows),
                         *(["--pack"] if a.pack else [])]
            torch_only = ["--rows", str(rows)]  # whet runs first in every round and writes it
    elif a.targets or a.batch_size or a.seq_len or a.data or a.pack or a.preset:
        sys.exit("error: --targets, --batch-size, --seq-len, --data, --pack and --preset are "
                 "train's")
    sides = {"whet": [str(whet), "bench", a.bench, *count, *both, *whet_only,
                      *shlex.split(a.whet_args)]}
    if a.objective == "dpo":
        if a.bench != "train" or a.data or a.device != "cpu" or a.preset:
            sys.exit("error: --objective dpo is train's, on random pairs on the CPU")
        pairs = a.batch_size or 2
        shape = ["--seq-len", str(a.seq_len or 128), "--prompt-tokens", str(a.prompt_tokens)]
        base = [str(whet), "bench", "train", *count, *shape, *shlex.split(a.whet_args)]
        if a.targets:
            base += ["--targets", a.targets]
        dpo = [*base, "--objective", "dpo", "--batch-size", str(pairs)]
        sides = {"whet": dpo, "whet-pre": [*dpo, "--precompute-ref"],
                 "whet-sft": [*base, "--objective", "sft", "--batch-size", str(2 * pairs)],
                 "trl": [a.python, str(ROOT / "scripts" / "bench_dpo_trl.py"), *count, *shape,
                         "--batch-size", str(pairs), *(["--targets", a.targets] if a.targets else []),
                         *shlex.split(a.torch_args)]}
        peer = "trl"
    elif peer == "torch":
        sides[peer] = [a.python, str(ROOT / "scripts" / f"bench_{a.bench}_torch.py"), *count,
                       *both, *torch_only, *shlex.split(a.torch_args)]
    else:
        if not pathlib.Path(a.llama_bench).exists():
            sys.exit(f"error: {a.llama_bench} not found; build it with scripts/build-llama-cpp.sh")
        threads = str(len(os.sched_getaffinity(0)))
        sides[peer] = [a.llama_bench, "-m", str(MODEL), "-p", "128", "-n", "64", "-t", threads,
                       "-r", str(a.runs), "-o", "json"]
    fields = FIELDS["train-gpu" if a.device == "cuda" else a.bench]
    env = TORCH_AVX2 if a.isa == "avx2" else {}  # the peer is PyTorch then (checked above)
    try:
        compare(a, sides, fields, peer, env)
    finally:
        if a.data:
            shutil.rmtree(rows.parent, ignore_errors=True)


def compare(a, sides, fields, peer, peer_env):
    """Run the sides alternately for `a.rounds` rounds (the peer with `peer_env` added to its
    environment), then print medians and ratios."""
    results = {side: [] for side in sides}
    for r in range(a.rounds):
        for side, cmd in sides.items():
            if side == "llama.cpp":
                values = llama_bench(cmd)
            else:
                out = run(cmd, peer_env if side == peer else None, gpu=a.device == "cuda")
                values = parse(out, fields, cmd)
            results[side].append(values)
            shown = ", ".join(f"{k} {v:g}" for k, v in values.items() if k != "load")
            print(f"round {r + 1}/{a.rounds} {side:8}: {shown} (load {values['load'][0]:.2f})",
                  flush=True)

    where = (f"{a.device}, {a.dtype}; " if a.bench == "train" else "")
    print(f"\n{a.bench}, {a.rounds} rounds, medians ({where}{os.cpu_count()} CPUs; flags: "
          f"{simd_flags()}; kernels: {a.isa}):")
    medians = {}
    for side, runs in results.items():
        medians[side] = {k: statistics.median(v[k] for v in runs) for k in fields}
        loads = [x for v in runs for x in v["load"]]
        shown = ", ".join(f"{k} {v:g}" for k, v in medians[side].items())
        print(f"  {side:5}: {shown}   load avg {min(loads):.2f}-{max(loads):.2f}")
    for k in fields:
        if medians[peer][k] > 0:
            print(f"  whet / {peer} {k}: {medians['whet'][k] / medians[peer][k]:.2f}x")
    if "whet-sft" in medians:
        tps = lambda side: medians[side]["tokens/s"]
        print(f"  DPO step / SFT step over the same tokens: {tps('whet-sft') / tps('whet'):.2f}x, "
              f"with --precompute-ref {tps('whet-sft') / tps('whet-pre'):.2f}x")


if __name__ == "__main__":
    main()
