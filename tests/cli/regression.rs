//! Regression tests, each named after the defect it guards (issue 31's adversarial run), and
//! the rules behind them tested on other commands and paths than the ones found.

use crate::*;
use std::path::Path;

/// A finished tiny training run in `dir/run` on [`dataset`]'s examples (also its test split).
fn tiny_run(dir: &Path) -> std::path::PathBuf {
    let data = dataset(dir);
    std::fs::copy(dir.join("train.jsonl"), dir.join("test.jsonl")).unwrap();
    let run = dir.join("run");
    let o = whet(
        &[
            "train",
            "--model",
            "random:tiny",
            "--data",
            &data,
            "--out",
            run.to_str().unwrap(),
            "--steps",
            "2",
            "--eval-every",
            "0",
            "--quiet",
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    run
}

/// `whet data prepare DATA --out OUT` for `random:tiny`, which must succeed.
fn prepare_tiny(data: &Path, out: &Path) {
    let (data, out) = (data.to_str().unwrap(), out.to_str().unwrap());
    let o = whet(&["data", "prepare", data, "--model", "random:tiny", "--out", out], "");
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Every file under `dir`, relative, sorted: what a refused command must leave as it was.
fn files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = vec![];
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn eval_and_compare_out_onto_a_training_run_deleted_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tiny_run(tmp.path());
    let before = files(&run);
    assert!(before.contains(&"adapter/adapter_model.safetensors".to_string()), "{before:?}");
    let (data, out) = (tmp.path().to_str().unwrap(), run.to_str().unwrap());
    let adapter = run.join("adapter");
    for overwrite in [false, true] {
        let mut eval = vec!["eval", "--model", "random:tiny", "--data", data, "--out", out];
        let mut compare = vec![
            "compare",
            "--model",
            "random:tiny",
            "--adapter",
            adapter.to_str().unwrap(),
            "--data",
            data,
            "--out",
            out,
        ];
        if overwrite {
            eval.push("--overwrite");
            compare.push("--overwrite");
        }
        for args in [&eval, &compare] {
            let err = assert_one_line_error(&whet(args, ""));
            // compare names the adapter inside the run, eval the run itself.
            let want = if overwrite { "was not written by `whet " } else { "already exists" };
            assert!(
                err.contains(want) || err.contains("holds this command's input (--adapter"),
                "{args:?}: {err}"
            );
            assert_eq!(files(&run), before, "{args:?} touched the run");
        }
    }
}

#[test]
fn data_prepare_over_its_own_input_replaced_the_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    dataset(&data);
    let d = data.to_str().unwrap();
    let before = files(&data);
    // The input itself, and a directory holding it, even with --overwrite.
    for out in [d, tmp.path().to_str().unwrap()] {
        let o = whet(
            &["data", "prepare", d, "--model", "random:tiny", "--out", out, "--overwrite"],
            "",
        );
        let err = assert_one_line_error(&o);
        assert!(err.contains("input (--data"), "{err}");
        assert_eq!(files(&data), before);
    }
}

#[test]
fn overwrite_wiped_any_directory_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let mine = tmp.path().join("mine");
    std::fs::create_dir_all(mine.join("notes")).unwrap();
    std::fs::write(mine.join("notes/todo.txt"), "keep me").unwrap();
    let m = mine.to_str().unwrap();
    let prepare = ["data", "prepare", &data, "--model", "random:tiny", "--out", m, "--overwrite"];
    let err = assert_one_line_error(&whet(&prepare, ""));
    assert!(err.contains("was not written by `whet data prepare`"), "{err}");
    // Nor by another command: a training run is not `merge`'s, nor a prepared dataset `train`'s.
    let rdir = tmp.path().join("r");
    std::fs::create_dir(&rdir).unwrap();
    let run = tiny_run(&rdir);
    let run_adapter = run.join("adapter");
    let merge = [
        "merge",
        "--model",
        "random:tiny",
        "--adapter",
        run_adapter.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--overwrite",
    ];
    let err = assert_one_line_error(&whet(&merge, ""));
    assert!(
        err.contains("input (--adapter") || err.contains("was not written by `whet merge`"),
        "{err}"
    );
    let train = [
        "train",
        "--model",
        "random:tiny",
        "--data",
        &data,
        "--out",
        m,
        "--overwrite",
        "--steps",
        "1",
    ];
    let err = assert_one_line_error(&whet(&train, ""));
    assert!(err.contains("was not written by `whet train`"), "{err}");
    assert_eq!(std::fs::read_to_string(mine.join("notes/todo.txt")).unwrap(), "keep me");
    // The command's own output is replaced, whole.
    let own = tmp.path().join("prepared");
    let own_args =
        ["data", "prepare", &data, "--model", "random:tiny", "--out", own.to_str().unwrap()];
    assert!(whet(&own_args, "").status.success());
    let err = assert_one_line_error(&whet(&own_args, ""));
    assert!(err.contains("already exists"), "{err}");
    let mut again = own_args.to_vec();
    again.push("--overwrite");
    let o = whet(&again, "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(own.join("manifest.json").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".whet-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn adapter_convert_overwrote_its_own_input() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("regex");
    std::fs::create_dir(&adapter).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(root().join("tests/fixtures/adapters/regex").join(f), adapter.join(f))
            .unwrap();
    }
    let model = root().join("tests/fixtures/families/llama3");
    let own = adapter.join("adapter_model.safetensors");
    let before = std::fs::read(&own).unwrap();
    let convert = |out: &Path, extra: &[&str]| {
        let mut args = vec!["adapter", "convert", adapter.to_str().unwrap(), "--to", "gguf"];
        args.extend(["--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        args.extend(extra);
        whet(&args, "")
    };
    for extra in [&[][..], &["--overwrite"][..]] {
        let err = assert_one_line_error(&convert(&own, extra));
        assert!(
            err.contains("already exists")
                || err.contains("not a file `whet adapter convert` writes"),
            "{err}"
        );
    }
    assert_eq!(std::fs::read(&own).unwrap(), before);
    // Its directory is an input too.
    let err = assert_one_line_error(&convert(&adapter, &[]));
    assert!(err.contains("input (the adapter)"), "{err}");
    // A GGUF file it wrote is replaced with --overwrite.
    let gguf = tmp.path().join("a.gguf");
    assert!(convert(&gguf, &[]).status.success());
    let o = convert(&gguf, &["--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn compare_and_eval_out_a_file_failed_only_after_all_the_work() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tiny_run(tmp.path());
    let file = tmp.path().join("report.txt");
    std::fs::write(&file, "mine").unwrap();
    let data = tmp.path().to_str().unwrap();
    // A model that does not exist: the --out check has to come first for this error to show.
    for args in [
        vec![
            "eval",
            "--model",
            "/nonexistent/model.gguf",
            "--data",
            data,
            "--out",
            file.to_str().unwrap(),
        ],
        vec![
            "compare",
            "--model",
            "/nonexistent/model.gguf",
            "--adapter",
            run.join("adapter").to_str().unwrap(),
            "--data",
            data,
            "--out",
            file.to_str().unwrap(),
        ],
    ] {
        let err = assert_one_line_error(&whet(&args, ""));
        assert!(err.contains("is a file"), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
}

#[test]
fn adapter_and_merged_safetensors_were_written_0600() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let run = tiny_run(tmp.path());
    let merged = tmp.path().join("merged");
    let o = whet(
        &[
            "merge",
            "--model",
            "random:tiny",
            "--adapter",
            run.join("adapter").to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let prepared = tmp.path().join("prepared");
    prepare_tiny(tmp.path(), &prepared);
    // The tests run with the umask they were given: every file whet writes has the mode a
    // plain new file gets here.
    let probe = tmp.path().join("probe");
    std::fs::write(&probe, "").unwrap();
    let want = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
    for f in [
        run.join("adapter/adapter_model.safetensors"),
        run.join("checkpoint/adapter_model.safetensors"),
        merged.join("model.safetensors"),
        merged.join("config.json"),
        prepared.join("train.safetensors"),
    ] {
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "{}: {mode:o}, want {want:o}", f.display());
    }
}

#[test]
fn one_sigint_made_whet_train_exit_0() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let run = tmp.path().join("run");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_whet"))
        .args([
            "train",
            "--model",
            "random:tiny",
            "--data",
            &data,
            "--out",
            run.to_str().unwrap(),
            "--steps",
            "100000",
            "--eval-every",
            "0",
            "--save-every",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !run.join("checkpoint/state.json").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "stderr: {}", stderr(&o));
    assert!(
        stdout(&o).contains("stopped:        interrupted; continue with --resume"),
        "{}",
        stdout(&o)
    );
    // The checkpoint is whole: the run resumes from it.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/state.json")).unwrap())
            .unwrap();
    assert!(state["step"].as_u64().unwrap() >= 1);
}

#[test]
fn resume_of_a_finished_run_printed_final_loss_nan() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tiny_run(tmp.path());
    let o = whet(&["train", "--out", run.to_str().unwrap(), "--resume"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("finished:") && out.contains("nothing to resume"), "{out}");
    assert!(!out.contains("NaN"), "{out}");
}

#[test]
fn data_check_dropping_every_example_exited_0() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let prepared = tmp.path().join("prepared");
    for args in [
        vec!["data", "check", &data, "--model", "random:tiny", "--max-seq-len", "5"],
        vec![
            "data",
            "prepare",
            &data,
            "--model",
            "random:tiny",
            "--max-seq-len",
            "5",
            "--out",
            prepared.to_str().unwrap(),
        ],
        vec![
            "train",
            "--model",
            "random:tiny",
            "--data",
            &data,
            "--max-seq-len",
            "5",
            "--out",
            prepared.to_str().unwrap(),
            "--steps",
            "1",
        ],
    ] {
        let err = assert_one_line_error(&whet(&args, ""));
        // One of the twelve is held out for validation.
        assert!(
            err.contains(
                "train.jsonl: all 11 examples are longer than --max-seq-len 5 and were dropped"
            ),
            "{args:?}: {err}"
        );
        assert!(!prepared.exists(), "{args:?} wrote {}", prepared.display());
    }
}

#[test]
fn a_template_with_nested_range_loops_hung_data_check() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let fixture = root().join("tests/fixtures/families/llama3");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture.join(f), model.join(f)).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    config["chat_template"] =
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}"
            .into();
    std::fs::write(model.join("tokenizer_config.json"), config.to_string()).unwrap();
    let m = model.to_str().unwrap();
    let failed = "tokenizer_config.json: chat template failed to render: rendering ran past";
    // `data check` names every line it cannot render.
    let o = whet(&["data", "check", &data, "--model", m], "");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.last(), Some(&"error: 12 problem(s) in the data; nothing was written"));
    assert!(lines[..lines.len() - 1].iter().all(|l| l.contains(failed)), "{err}");
    let o = whet(&["generate", "--model", m, "--chat", "--prompt", "hi", "--max-tokens", "2"], "");
    let err = assert_one_line_error(&o);
    assert!(err.contains(failed), "{err}");
}

#[test]
fn generate_with_an_empty_stop_string_gave_an_empty_answer_and_rc_0() {
    let o = whet(&["generate", "--model", "random:tiny", "--prompt", "hi", "--stop", ""], "");
    let err = assert_one_line_error(&o);
    assert!(err.contains("--stop `` is empty"), "{err}");
}

#[test]
fn a_temperature_of_1e_40_failed_with_a_backtrace() {
    for t in ["1e-40", "1e-300"] {
        let o = whet(
            &[
                "generate",
                "--model",
                "random:tiny",
                "--prompt",
                "hi",
                "--max-tokens",
                "4",
                "--temperature",
                t,
            ],
            "",
        );
        assert!(o.status.success(), "--temperature {t}: {}", stderr(&o));
        assert!(!stderr(&o).contains("backtrace"), "{}", stderr(&o));
    }
}

#[test]
fn generate_adapter_weight_nan_gave_0_tokens_and_rc_0() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tiny_run(tmp.path());
    for w in ["NaN", "inf", "-inf", "1e39"] {
        let spec = format!("s={}:{w}", run.join("adapter").display());
        let o =
            whet(&["generate", "--model", "random:tiny", "--adapter", &spec, "--prompt", "hi"], "");
        let err = assert_one_line_error(&o);
        assert!(err.contains(&format!("weight `{w}` is not a finite f32 number")), "{err}");
    }
}

/// A copy of the `regex` fixture adapter in `dir/name`, `edit` applied to its safetensors bytes
/// (header length, then the header, then the data).
fn edited_adapter(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> std::path::PathBuf {
    let src = root().join("tests/fixtures/adapters/regex");
    let a = dir.join(name);
    std::fs::create_dir(&a).unwrap();
    std::fs::copy(src.join("adapter_config.json"), a.join("adapter_config.json")).unwrap();
    let mut bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    edit(&mut bytes);
    std::fs::write(a.join("adapter_model.safetensors"), bytes).unwrap();
    a
}

#[test]
fn an_adapter_with_nan_tensors_loaded_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/families/llama3");
    let start = |b: &Vec<u8>| 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let nan = edited_adapter(tmp.path(), "nan", |b| {
        let at = start(b) + 4;
        b[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let inf = edited_adapter(tmp.path(), "inf", |b| {
        let at = start(b);
        b[at..at + 4].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
    });
    let truncated = edited_adapter(tmp.path(), "truncated", |b| b.truncate(b.len() - 16));
    for (dir, what) in
        [(&nan, "NaN"), (&inf, "-inf"), (&truncated, "not a readable safetensors file")]
    {
        let d = dir.to_str().unwrap();
        for args in [
            vec!["generate", "--model", model.to_str().unwrap(), "--adapter", d, "--prompt", "hi"],
            vec!["adapter", "info", d],
            vec!["adapter", "check", d, "--for", "vllm"],
            vec!["adapter", "check", d, "--for", "peft"],
        ] {
            let o = whet(&args, "");
            assert_eq!(o.status.code(), Some(1), "{args:?} passed: {}", stdout(&o));
            let all = stdout(&o) + &stderr(&o);
            assert!(
                all.contains(what) && all.contains("adapter_model.safetensors"),
                "{args:?}: {all}"
            );
            assert!(!all.contains("panicked"), "{all}");
        }
    }
}

#[test]
fn a_misspelt_dataset_field_was_silently_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let lines: String = (0..12)
        .map(|i| format!("{{\"messages\":[{{\"role\":\"user\",\"content\":\"q{i}\"}},{{\"role\":\"assistant\",\"content\":\"a\",\"trian\":false}}]}}\n"))
        .collect();
    std::fs::write(tmp.path().join("train.jsonl"), lines).unwrap();
    let o = whet(&["data", "check", tmp.path().to_str().unwrap(), "--model", "random:tiny"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("train.jsonl:1: message field `trian` is not one whet reads (it is ignored; 12 record(s) have it); hint: did you mean `train`?"),
        "{err}"
    );
    assert_eq!(err.matches("trian").count(), 1, "one warning per field, not per line: {err}");
}

#[test]
fn chat_quit_on_invalid_utf8_input() {
    let o = whet_bytes(
        &["chat", "--model", "random:tiny", "--max-tokens", "2", "--temperature", "0"],
        b"hi\n\xff\xfe oops\nhello\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(
            "error: input line 2 is not valid UTF-8 (byte 0xff at column 1); it was not sent"
        ),
        "{err}"
    );
    // The conversation went on as if the bad line had not been typed.
    let args = ["chat", "--model", "random:tiny", "--max-tokens", "2", "--temperature", "0"];
    let clean = whet(&args, "hi\nhello\n");
    assert!(clean.status.success(), "{}", stderr(&clean));
    assert_eq!(stdout(&o), stdout(&clean));
    assert!(!stdout(&o).is_empty());
}

#[test]
fn random_tiny_with_context_512_silently_trained_at_2048() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let out = tmp.path().join("run");
    let train = |data: &str, extra: &[&str]| {
        let mut args = vec!["train", "--model", "random:tiny", "--data", data, "--steps", "1"];
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        whet(&args, "")
    };
    let err = assert_one_line_error(&train(&data, &["--max-seq-len", "2048"]));
    assert!(
        err.contains("--max-seq-len 2048 is longer than the context of random:tiny (512 tokens)"),
        "{err}"
    );
    assert!(stderr(&train(&data, &["--max-seq-len", "2048"]))
        .contains("hint: pass --max-seq-len 512 or less"));
    assert!(!out.exists());
    // A dataset prepared at 2048 with a longer example is refused as well.
    let long = tmp.path().join("long");
    std::fs::create_dir(&long).unwrap();
    let word = "word ".repeat(120); // some 600 byte-level tokens
    let lines: String = (0..12)
        .map(|i| format!("{{\"messages\":[{{\"role\":\"user\",\"content\":\"q{i} {word}\"}},{{\"role\":\"assistant\",\"content\":\"a\"}}]}}\n"))
        .collect();
    std::fs::write(long.join("train.jsonl"), lines).unwrap();
    let prepared = tmp.path().join("prepared");
    prepare_tiny(&long, &prepared);
    let err = assert_one_line_error(&train(prepared.to_str().unwrap(), &[]));
    assert!(err.contains("longer than the context of random:tiny (512 tokens)"), "{err}");
    assert!(!out.exists());
}
