//! End-to-end tests of the `whet` binary: real commands, exit codes, stdout and stderr.

mod bad_input;
mod commands;
mod data;
mod distill;
mod eval;
mod llama_cpp;
mod mpi;
mod pages;
mod preference;
mod regression;
mod serve;
mod train;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Twelve chat examples (`q{i}` answered `answer {i % 3}`) in `dir/train.jsonl`; `dir`.
pub fn dataset(dir: &Path) -> String {
    let lines: String = (0..12)
        .map(|i| format!("{{\"messages\":[{{\"role\":\"user\",\"content\":\"q{i}\"}},{{\"role\":\"assistant\",\"content\":\"answer {}\"}}]}}\n", i % 3))
        .collect();
    std::fs::write(dir.join("train.jsonl"), lines).unwrap();
    dir.to_str().unwrap().to_string()
}

/// Start `whet ARGS` (a training run saving a checkpoint every step into `run`), SIGKILL it once
/// its checkpoint holds step `at_least` (or after two minutes), and return the checkpoint's step.
pub fn sigkill_after_step(args: &[&str], run: &Path, at_least: u64) -> u64 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_whet"))
        .args(args)
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let state = run.join("checkpoint/state.json");
    let step = || {
        std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["step"].as_u64())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !step().is_some_and(|s| s >= at_least) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    step().unwrap()
}

/// `whet ARGS` run from the repository root, with `stdin` fed in.
pub fn whet(args: &[&str], stdin: &str) -> Output {
    whet_in(&root(), args, stdin, &[])
}

/// `whet ARGS` run in `dir` with extra environment variables.
pub fn whet_in(dir: &Path, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    whet_in_bytes(dir, args, stdin.as_bytes(), env)
}

/// `whet ARGS` run from the repository root with `stdin` bytes that need not be UTF-8.
pub fn whet_bytes(args: &[&str], stdin: &[u8]) -> Output {
    whet_in_bytes(&root(), args, stdin, &[])
}

fn whet_in_bytes(dir: &Path, args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_whet"));
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.env_remove("WHET_MODEL").env_remove("WHET_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("whet runs");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Whether the default model is here; without it, tests that need it say so and pass only
/// when `WHET_REQUIRE_MODEL` is not `1` (scripts/test.sh sets it).
pub fn have_default_model() -> bool {
    let path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.exists() {
        return true;
    }
    if std::env::var("WHET_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        panic!(
            "{} is missing and WHET_REQUIRE_MODEL=1; run scripts/fetch-model.sh",
            path.display()
        );
    }
    eprintln!("SKIPPED: default model not fetched; run scripts/fetch-model.sh");
    false
}

/// The Python the tests run: `WHET_PYTHON`, else the project's `.venv/` (made by
/// scripts/test.sh, see scripts/lib.sh), else `python3`.
pub fn python() -> String {
    if let Ok(p) = std::env::var("WHET_PYTHON") {
        return p;
    }
    let venv = root().join(".venv/bin/python");
    if venv.exists() {
        return venv.display().to_string();
    }
    "python3".into()
}

/// [`python`] when it imports every one of `modules` (`"torch, peft"`); otherwise `None`,
/// after saying on stderr that the test checks nothing.
pub fn python_with(modules: &str) -> Option<String> {
    let python = python();
    let probe =
        std::process::Command::new(&python).args(["-c", &format!("import {modules}")]).output();
    if probe.is_ok_and(|o| o.status.success()) {
        return Some(python);
    }
    eprintln!("SKIPPED: {python} lacks {modules}; run scripts/test.sh (it installs them into .venv/) or set WHET_PYTHON to a Python that has them");
    None
}

/// A `random:tiny` model written as a Hugging Face directory with `chat_template`.
pub fn tiny_hf_dir(chat_template: Option<&str>) -> tempfile::TempDir {
    use candle_core::{DType, Device};
    let dir = tempfile::tempdir().unwrap();
    let cfg = whet_model::io::presets::preset("tiny").unwrap();
    let tensors =
        whet_model::io::presets::random_weights(&cfg, DType::F32, &Device::Cpu, 1).unwrap();
    let mut tok = whet_model::ModelTokenizer::byte_level().unwrap();
    tok.chat_template = chat_template.map(str::to_string);
    whet_model::io::export::save_hf_dir(dir.path(), &cfg, &tensors, &tok, 1).unwrap();
    dir
}

/// Assert a failed run: exit code 1, and stderr is one `error:` line (plus an optional `hint:`).
/// As [`assert_one_line_error`], for commands that print progress lines before the work that
/// fails: the error is the last line but for a hint.
pub fn assert_error_after_progress(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "stdout: {}\nstderr: {}", stdout(o), stderr(o));
    let err = stderr(o);
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    let at = lines.iter().position(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{err}"));
    let rest = &lines[at + 1..];
    assert!(rest.is_empty() || (rest.len() == 1 && rest[0].starts_with("hint: ")), "{err}");
    lines[at].to_string()
}

pub fn assert_one_line_error(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "stdout: {}\nstderr: {}", stdout(o), stderr(o));
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines.len() == 1 || (lines.len() == 2 && lines[1].starts_with("hint: ")), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    lines[0].to_string()
}
