//! `whet train` end to end on the tiny random model: a run, its adapter used by `generate`,
//! SIGKILL and resume equal to an uninterrupted run, a full disk, and refused settings.

use crate::*;
use std::path::Path;

fn train_args<'a>(data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        "random:tiny",
        "--data",
        data,
        "--out",
        out,
        "--steps",
        steps,
        "--targets",
        "all-linear",
        "--learning-rate",
        "1e-2",
        "--eval-every",
        "0",
    ]
}

#[test]
fn train_then_generate_with_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let out = dir.path().join("run");
    let mut args = train_args(&data, out.to_str().unwrap(), "30");
    args.push("--grad-checkpoint"); // learns the same way, recomputing each layer
    let o = whet(&args, "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("adapter:        {}", out.join("adapter").display())),
        "{}",
        stdout(&o)
    );
    let toml = std::fs::read_to_string(out.join("whet.toml")).unwrap();
    assert!(
        toml.contains("target_modules = \"all-linear\"")
            && toml.contains("steps = 30")
            && toml.contains("grad_checkpoint = true"),
        "{toml}"
    );
    let base = whet(
        &["generate", "--model", "random:tiny", "--chat", "--prompt", "q1", "--max-tokens", "8"],
        "",
    );
    let tuned = whet(
        &[
            "generate",
            "--model",
            "random:tiny",
            "--adapter",
            out.join("adapter").to_str().unwrap(),
            "--chat",
            "--prompt",
            "q1",
            "--max-tokens",
            "8",
        ],
        "",
    );
    assert!(tuned.status.success(), "{}", stderr(&tuned));
    assert_ne!(stdout(&base), stdout(&tuned), "the adapter changes the output");
    assert!(
        stdout(&tuned).starts_with("answer"),
        "learned the answer pattern: {:?}",
        stdout(&tuned)
    );
}

/// Kill a run with SIGKILL mid-way, resume it, and get the adapter an uninterrupted run gives.
#[test]
fn sigkill_and_resume_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let steps = "300";
    let straight = dir.path().join("straight");
    let o = whet(&train_args(&data, straight.to_str().unwrap(), steps), "");
    assert!(o.status.success(), "{}", stderr(&o));

    let killed = dir.path().join("killed");
    let mut args = train_args(&data, killed.to_str().unwrap(), steps);
    args.extend(["--save-every", "1"]);
    let at = sigkill_after_step(&args, &killed, 20);
    assert!(at < 300, "killed before the end (at step {at})");
    let o = whet(&["train", "--out", killed.to_str().unwrap(), "--resume"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    let a = std::fs::read(straight.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed adapter differs from the uninterrupted one (killed at step {at})");
}

#[test]
fn refused_settings_say_what_and_keep_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let mut args = train_args(&data, out_s, "3");
    let at = args.iter().position(|a| *a == "all-linear").unwrap();
    args[at] = "q_proj,attn";
    assert!(assert_one_line_error(&whet(&args, "")).contains("unknown target module `attn`"));
    assert!(!out.exists(), "nothing created for a refused run");
    let mut args = train_args(&data, out_s, "3");
    args.extend(["--rank", "0"]);
    assert!(assert_one_line_error(&whet(&args, "")).contains("`r` (rank) must be at least 1"));
    let empty = tempfile::tempdir().unwrap();
    let o = whet(&train_args(empty.path().to_str().unwrap(), out_s, "3"), "");
    assert!(stderr(&o).contains("no `train.jsonl` in this directory"), "{}", stderr(&o));
    assert!(whet(&train_args(&data, out_s, "3"), "").status.success());
    let before = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    let o = whet(&train_args(&data, out_s, "3"), "");
    assert!(assert_one_line_error(&o).contains("already holds files; hint: pass --resume"));
    let o = whet(&["train", "--out", out_s, "--resume", "--learning-rate", "0.5"], "");
    assert!(
        assert_one_line_error(&o).contains("`learning_rate` was 0.01 and is now 0.5"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap(), before);
    let mut args = train_args(&data, out_s, "3");
    args.push("--overwrite");
    assert!(whet(&args, "").status.success());
}

/// Bytes a tmpfs charges for the files under `dir`: whole 4 KiB pages.
fn pages(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len().div_ceil(4096) * 4096)
        .sum()
}

/// Disk full while saving, on a real filesystem: the run lives on a small tmpfs mounted in a
/// private mount namespace (`unshare`, no root needed), where a filler leaves room for the first
/// checkpoint (step 4) but not for the second. The run stops with an error naming the write
/// that failed, the step-4 checkpoint survives, and once space is freed `--resume` finishes with
/// the adapter an uninterrupted run gives. Where namespaces are not allowed it says so and
/// checks nothing.
#[test]
fn disk_full_while_saving_keeps_the_last_checkpoint() {
    let probe = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "true"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED disk_full_while_saving_keeps_the_last_checkpoint: `unshare --user --mount` is not available here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let straight = dir.path().join("straight");
    let mut args = train_args(&data, straight.to_str().unwrap(), "8");
    args.extend(["--save-every", "4"]);
    let o = whet(&args, "");
    assert!(o.status.success(), "{}", stderr(&o));
    let checkpoint = pages(&straight.join("checkpoint"));
    let room = 8192 + checkpoint + checkpoint / 2; // whet.toml, metrics.jsonl, 1.5 checkpoints

    let (mnt, logs) = (dir.path().join("mnt"), dir.path().join("logs"));
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&logs).unwrap();
    let script = r#"
        mount -t tmpfs -o size=16m tmpfs "$MNT" || exit 90
        avail=$(df -B1 --output=avail "$MNT" | tail -1)
        head -c $((avail - ROOM)) /dev/zero > "$MNT/filler"
        "$WHET" "$@" > /dev/null 2> "$LOGS/full.err"; echo $? > "$LOGS/full.rc"
        cp "$MNT/run/checkpoint/state.json" "$LOGS/state.json"
        rm "$MNT/filler"
        "$WHET" train --out "$MNT/run" --resume > /dev/null 2> "$LOGS/resume.err"
        echo $? > "$LOGS/resume.rc"
        cp "$MNT/run/adapter/adapter_model.safetensors" "$LOGS/"
    "#;
    let run = mnt.join("run");
    let mut args = train_args(&data, run.to_str().unwrap(), "8");
    args.extend(["--save-every", "4"]);
    let o = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"])
        .args(&args)
        .current_dir(root())
        .env("WHET", env!("CARGO_BIN_EXE_whet"))
        .env("MNT", &mnt)
        .env("LOGS", &logs)
        .env("ROOM", room.to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |name: &str| std::fs::read_to_string(logs.join(name)).unwrap();
    let err = read("full.err");
    assert_eq!(read("full.rc").trim(), "1", "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains(run.to_str().unwrap()), "names the path: {err}");
    let state: serde_json::Value = serde_json::from_str(&read("state.json")).unwrap();
    assert_eq!(state["step"], 4, "the step-4 checkpoint survives");
    assert_eq!(read("resume.rc").trim(), "0", "{}", read("resume.err"));
    let a = std::fs::read(straight.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(logs.join("adapter_model.safetensors")).unwrap();
    assert!(a == b, "the resumed adapter differs from the uninterrupted run's");
}

/// PEFT reads whet's adapter: Hugging Face PEFT on the same base gives the same greedy reply as
/// `whet generate --adapter`. Needs Python with torch, transformers, gguf and peft
/// (`WHET_PYTHON`, default `python3`); without them it says so and checks nothing.
#[test]
fn peft_loads_the_adapter_and_agrees() {
    if !have_default_model() {
        return;
    }
    let Some(python) = python_with("torch, transformers, gguf, peft") else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let data = root().join("data/support-style");
    let o = whet(
        &[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "4",
            "--learning-rate",
            "3e-3",
            "--warmup-steps",
            "0",
            "--targets",
            "all-linear",
            "--eval-every",
            "0",
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let adapter = out.join("adapter");
    let prompt = "Where is my order FJ-24680?";
    let ours = whet(
        &[
            "generate",
            "--adapter",
            adapter.to_str().unwrap(),
            "--chat",
            "--prompt",
            prompt,
            "--max-tokens",
            "30",
        ],
        "",
    );
    let script = root().join("scripts/check_peft.py");
    let logits_file = dir.path().join("peft_logits.json");
    let theirs = std::process::Command::new(&python)
        .args([
            script.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-tokens",
            "30",
            "--logits",
            logits_file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(theirs.status.success(), "{}", String::from_utf8_lossy(&theirs.stderr));
    let theirs = String::from_utf8_lossy(&theirs.stdout).trim().to_string();
    eprintln!("whet: {}\npeft: {theirs}", stdout(&ours).trim());
    assert_eq!(stdout(&ours).trim(), theirs);

    // The logits of the prompt's last position, PEFT's against whet's on the same token ids,
    // with and without the adapter (which must make a difference).
    let peft: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&logits_file).unwrap()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(peft["ids"].clone()).unwrap();
    let want: Vec<f32> = serde_json::from_value(peft["logits"].clone()).unwrap();
    let logits = |adapter: Option<&std::path::Path>| {
        let gguf = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let source = whet_model::ModelSource::Gguf(gguf);
        let cpu = candle_core::Device::Cpu;
        let mut model = whet_model::load(&source, candle_core::DType::F32, &cpu, 0).unwrap().model;
        if let Some(dir) = adapter {
            whet_model::adapter::load_adapter(&mut model, dir).unwrap();
        }
        let n = ids.len();
        let input = candle_core::Tensor::from_vec(ids.clone(), (1, n), &cpu).unwrap();
        let out = model.forward_last(&input, None).unwrap();
        out.squeeze(0).unwrap().to_vec1::<f32>().unwrap()
    };
    let max_diff =
        |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let (ours, base) = (logits(Some(&adapter)), logits(None));
    assert_eq!(ours.len(), want.len());
    let (err, effect) = (max_diff(&ours, &want), max_diff(&base, &want));
    eprintln!("max |whet - PEFT| logit: {err}; the adapter moves logits by up to {effect}");
    assert!(err < 2e-3, "max |whet - PEFT| logit = {err}");
    assert!(effect > 100.0 * err, "the adapter changes little: {effect}");
}

/// Boolean settings a config file turns on can be turned off by a flag (`--no-pack`), and
/// `data prepare --pack` is not just recorded: training on that directory packs, unless
/// `--no-pack`. `--format`, `--overlong` and `--epochs` reach `whet train` too; the resolved
/// values land in whet.toml.
#[test]
fn train_flags_turn_settings_on_and_off() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let config = dir.path().join("train.toml");
    std::fs::write(&config, "pack = true\ngrad_checkpoint = true\n").unwrap();
    let saved =
        |run: &str| std::fs::read_to_string(dir.path().join(run).join("whet.toml")).unwrap();
    let out = dir.path().join("a");
    let mut args = train_args(&data, out.to_str().unwrap(), "2");
    args.extend(["--config", config.to_str().unwrap(), "--no-pack"]);
    let o = whet(&args, "");
    assert!(o.status.success(), "{}", stderr(&o));
    let toml = saved("a");
    assert!(toml.contains("pack = false") && toml.contains("grad_checkpoint = true"), "{toml}");

    // A dataset prepared with --pack trains packed.
    let prepared = dir.path().join("prepared");
    let o = whet(
        &[
            "data",
            "prepare",
            &data,
            "--model",
            "random:tiny",
            "--out",
            prepared.to_str().unwrap(),
            "--pack",
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let p = prepared.to_str().unwrap();
    let [b, c, d, e] =
        ["b", "c", "d", "e"].map(|r| dir.path().join(r).to_str().unwrap().to_string());
    let o = whet(&train_args(p, &b, "2"), "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(saved("b").contains("pack = true"), "{}", saved("b"));
    let mut args = train_args(p, &c, "2");
    args.push("--no-pack");
    assert!(whet(&args, "").status.success());
    assert!(saved("c").contains("pack = false"));

    // --format, --overlong and --epochs (12 examples, 10% held out: 11 rows, 3 batches of 4).
    let mut args = train_args(&data, &d, "2");
    args.retain(|a| *a != "--steps" && *a != "2");
    args.extend(["--format", "chat", "--overlong", "drop", "--epochs", "2"]);
    let o = whet(&args, "");
    assert!(o.status.success(), "{}", stderr(&o));
    let toml = saved("d");
    for want in ["format = \"chat\"", "overlong = \"drop\"", "epochs = 2.0", "steps = 6"] {
        assert!(toml.contains(want), "{want} in {toml}");
    }
    // A value a setting does not have is refused with its possible values, from a flag or a
    // config file alike.
    let mut args = train_args(&data, &e, "2");
    args.extend(["--overlong", "squash"]);
    let o = whet(&args, "");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("invalid value 'squash' for '--overlong <OVERLONG>'"), "{err}");
    assert!(err.contains("[possible values: truncate, drop]"), "{err}");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "overlong = \"squash\"\n").unwrap();
    let mut args = train_args(&data, &e, "2");
    args.extend(["--config", file.to_str().unwrap()]);
    let err = assert_one_line_error(&whet(&args, ""));
    assert!(
        err.contains("bad.toml: unknown variant `squash`, expected `truncate` or `drop`"),
        "{err}"
    );
    assert!(!std::path::Path::new(&e).exists());
}

/// QLoRA: a run over a base kept in q8_0 records it in whet.toml and learns the pattern (the
/// adapter then works over the dense base too); an unknown quantization is refused by name
/// before anything is written.
#[test]
fn qlora_run_over_a_quantized_base_learns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let out = dir.path().join("run");
    let mut args = train_args(&data, out.to_str().unwrap(), "30");
    args.extend(["--quantize-base", "q5_1"]);
    let o = whet(&args, "");
    assert_eq!(o.status.code(), Some(2), "a usage error: {}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("invalid value 'q5_1' for '--quantize-base <TYPE>'"), "{err}");
    assert!(err.contains("[possible values: q8_0, q4_0]"), "{err}");
    assert!(!out.exists(), "nothing created for a refused run");
    let at = args.len() - 1;
    args[at] = "q8_0";
    let o = whet(&args, "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("linear layers quantized to Q8_0"), "{}", stderr(&o));
    let toml = std::fs::read_to_string(out.join("whet.toml")).unwrap();
    assert!(toml.contains("quantize_base = \"q8_0\""), "{toml}");
    let adapter = out.join("adapter");
    let tuned = whet(
        &["generate", "--model", "random:tiny", "--adapter", adapter.to_str().unwrap()]
            .into_iter()
            .chain(["--chat", "--prompt", "q1", "--max-tokens", "8"])
            .collect::<Vec<_>>(),
        "",
    );
    assert!(tuned.status.success(), "{}", stderr(&tuned));
    assert!(stdout(&tuned).starts_with("answer"), "learned: {:?}", stdout(&tuned));
}
