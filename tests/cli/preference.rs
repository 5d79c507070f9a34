//! Preference data (`prompt`, `chosen`, `rejected` pairs; KTO's `prompt`, `completion`, `label`
//! answers) and the preference objectives end to end on the tiny random model: training logs
//! TRL's reward metrics, every objective runs, a killed run resumes to the same adapter, and bad
//! records or mismatched data are refused by file:line.
//! The numbers themselves are checked against TRL in whet-train's golden test.

use crate::*;
use std::path::Path;

/// Ten pairs in `dir/train.jsonl` and two in `dir/valid.jsonl`, strings and messages mixed.
fn pairs(dir: &Path) -> String {
    let line = |i: usize| {
        if i % 2 == 0 {
            format!(r#"{{"prompt":"q{i}","chosen":"good answer {}","rejected":"bad {i}"}}"#, i % 3)
        } else {
            format!(
                r#"{{"system":"Be kind.","prompt":[{{"role":"user","content":"q{i}"}}],"chosen":[{{"role":"assistant","content":"good answer {}"}}],"rejected":[{{"role":"assistant","content":"no"}}]}}"#,
                i % 3
            )
        }
    };
    let text = |r: std::ops::Range<usize>| r.map(|i| line(i) + "\n").collect::<String>();
    std::fs::write(dir.join("train.jsonl"), text(0..10)).unwrap();
    std::fs::write(dir.join("valid.jsonl"), text(10..12)).unwrap();
    dir.to_str().unwrap().to_string()
}

/// Twelve answers marked desirable or not in `dir/train.jsonl` (two desirable for every
/// undesirable one, strings and messages mixed) and four in `dir/valid.jsonl`.
fn unpaired(dir: &Path) -> String {
    let line = |i: usize| {
        let good = i % 3 != 2;
        let answer = if good { format!("good answer {}", i % 3) } else { format!("bad {i}") };
        if i % 2 == 0 {
            format!(r#"{{"prompt":"q{i}","completion":"{answer}","label":{good}}}"#)
        } else {
            format!(
                r#"{{"system":"Be kind.","prompt":[{{"role":"user","content":"q{i}"}}],"completion":[{{"role":"assistant","content":"{answer}"}}],"label":{good}}}"#
            )
        }
    };
    let text = |r: std::ops::Range<usize>| r.map(|i| line(i) + "\n").collect::<String>();
    std::fs::write(dir.join("train.jsonl"), text(0..12)).unwrap();
    std::fs::write(dir.join("valid.jsonl"), text(12..16)).unwrap();
    dir.to_str().unwrap().to_string()
}

fn args<'a>(data: &'a str, out: &'a str, objective: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        "random:tiny",
        "--data",
        data,
        "--out",
        out,
        "--objective",
        objective,
        "--steps",
        steps,
        "--batch-size",
        "4",
        "--targets",
        "all-linear",
        "--learning-rate",
        "1e-2",
        "--eval-every",
        "0",
    ]
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_preference_objective_trains_and_logs_its_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let data = pairs(dir.path());
    for (i, (objective, extra)) in [
        ("dpo", vec![]),
        ("dpo", vec!["--label-smoothing", "0.1"]),
        ("dpo", vec!["--precompute-ref"]),
        ("dpo", vec!["--rpo-alpha", "0.5"]),
        ("ipo", vec![]),
        ("simpo", vec!["--beta", "2", "--gamma", "0.3"]),
        ("orpo", vec![]),
    ]
    .into_iter()
    .enumerate()
    {
        let run = dir.path().join(format!("{objective}{i}"));
        let mut a = args(&data, run.to_str().unwrap(), objective, "12");
        a.extend(extra.iter().copied());
        let o = whet(&a, "");
        assert!(o.status.success(), "{objective} {extra:?}: {}", stderr(&o));
        let m = metrics(&run);
        let steps: Vec<_> = m.iter().filter(|v| v.get("loss").is_some()).collect();
        assert_eq!(steps.len(), 12, "{objective}");
        for key in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ] {
            assert!(steps.iter().all(|v| v[key].is_f64()), "{objective}: {key} in every step");
        }
        if objective == "orpo" {
            assert!(steps[0]["nll_loss"].is_f64() && steps[0]["log_odds_ratio"].is_f64());
        }
        // The loss falls; and but for ORPO (whose cross-entropy on the chosen answers lifts
        // both answers' log-probabilities) the reward margin grows.
        let get = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
        assert!(get(steps[11], "loss") < get(steps[0], "loss"), "{objective} {extra:?}: loss");
        if objective != "orpo" {
            let (a, b) = (get(steps[0], "rewards/margins"), get(steps[11], "rewards/margins"));
            assert!(b > a, "{objective} {extra:?}: margins {a} -> {b}");
        }
        // Validation on the held-out pairs reports the same metrics.
        let eval = m.iter().find(|v| v.get("val_loss").is_some()).unwrap();
        assert!(eval["rewards/accuracies"].is_f64(), "{eval}");
        assert!(stderr(&o).contains("margin"), "{}", stderr(&o));
    }
    // KTO on answers marked desirable or not: its metrics, a falling loss, a growing margin.
    let kto_dir = tempfile::tempdir().unwrap();
    let kto_data = unpaired(kto_dir.path());
    for extra in [vec![], vec!["--precompute-ref", "--undesirable-weight", "1.5"]] {
        let run = kto_dir.path().join(format!("kto{}", extra.len()));
        let mut a = args(&kto_data, run.to_str().unwrap(), "kto", "12");
        a.extend(extra.iter().copied());
        let o = whet(&a, "");
        assert!(o.status.success(), "kto {extra:?}: {}", stderr(&o));
        let m = metrics(&run);
        let steps: Vec<_> = m.iter().filter(|v| v.get("loss").is_some()).collect();
        assert_eq!(steps.len(), 12);
        // A batch of four may lack undesirable (or desirable) answers: that side is null.
        for key in ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"] {
            assert!(steps.iter().all(|v| v[key].is_f64() || v[key].is_null()), "kto: {key}");
        }
        assert!(steps.iter().all(|v| v["kl"].is_f64()), "kto: kl in every step");
        let get = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
        assert!(get(steps[11], "loss") < get(steps[0], "loss"), "kto {extra:?}: loss");
        // The margin starts at 0 (policy = reference) and grows.
        let late: Vec<f64> =
            steps[6..].iter().filter_map(|v| v["rewards/margins"].as_f64()).collect();
        assert!(!late.is_empty() && late.iter().sum::<f64>() / late.len() as f64 > 0.0, "{late:?}");
        assert!(steps.iter().all(|v| get(v, "kl") >= 0.0), "the KL estimate is clamped at 0");
        let eval = m.iter().find(|v| v.get("val_loss").is_some()).unwrap();
        assert!(eval["kl"].is_f64(), "{eval}");
    }
    let first = &metrics(&kto_dir.path().join("kto0"))[0];
    assert!((first["loss"].as_f64().unwrap() - 0.5).abs() < 1e-4, "{first}");

    // loss.svg draws the reward margins below the loss.
    let svg = std::fs::read_to_string(dir.path().join("dpo0/loss.svg")).unwrap();
    assert!(svg.contains("reward margin"), "loss.svg without the margins panel");
    // DPO starts at ln 2: the adapter's B is zero, so policy and reference agree.
    let first = &metrics(&dir.path().join("dpo0"))[0];
    assert!((first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4, "{first}");
}

#[test]
fn sigkill_and_resume_of_dpo_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = pairs(dir.path());
    let straight = dir.path().join("straight");
    let mut a = args(&data, straight.to_str().unwrap(), "dpo", "60");
    a.push("--precompute-ref");
    assert!(whet(&a, "").status.success());
    let killed = dir.path().join("killed");
    let mut a = args(&data, killed.to_str().unwrap(), "dpo", "60");
    a.extend(["--precompute-ref", "--save-every", "1"]);
    let at = sigkill_after_step(&a, &killed, 5);
    assert!(at < 60, "killed before the end (at step {at})");
    let o = whet(&["train", "--out", killed.to_str().unwrap(), "--resume"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    let a = std::fs::read(straight.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed DPO adapter differs from the uninterrupted one (killed at step {at})");
}

#[test]
fn bad_pairs_and_mismatched_data_are_refused_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let cases = [
        (r#"{"prompt":"a","chosen":"b"}"#, "train.jsonl:2: missing field `rejected`"),
        (r#"{"prompt":"a","chosen":"","rejected":"c"}"#, "train.jsonl:2: field `chosen` is empty"),
        (r#"{"prompt":"a","chosen":7,"rejected":"c"}"#, "train.jsonl:2: field `chosen` must be a string or a list of messages, got a number"),
        (
            r#"{"chosen":[{"role":"user","content":"x"},{"role":"assistant","content":"y"}],"rejected":[{"role":"user","content":"z"},{"role":"assistant","content":"w"}]}"#,
            "train.jsonl:2: the prompts of `chosen` and `rejected` differ at message 0",
        ),
        (
            r#"{"prompt":"a","chosen":[{"role":"user","content":"b"}],"rejected":"c"}"#,
            "train.jsonl:2: `chosen[0]` is a `user` message; an answer holds assistant messages only",
        ),
        (
            r#"{"prompt":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}],"chosen":"c","rejected":"d"}"#,
            "train.jsonl:2: the prompt's last message must be the user's",
        ),
    ];
    let kto_cases = [
        (r#"{"prompt":"a","completion":"b","label":"yes"}"#, "train.jsonl:2: field `label` must be true or false, got a string"),
        (r#"{"prompt":"a","completion":"b","label":1}"#, "train.jsonl:2: field `label` must be true or false, got a number"),
        (r#"{"prompt":"a","completion":"b","label":null}"#, "train.jsonl:2: missing field `label`"),
        (r#"{"completion":"b","label":true}"#, "train.jsonl:2: missing field `prompt`"),
        (r#"{"prompt":"a","completion":"","label":true}"#, "train.jsonl:2: field `completion` is empty"),
        (
            r#"{"prompt":"a","completion":[{"role":"user","content":"b"}],"label":false}"#,
            "train.jsonl:2: `completion[0]` is a `user` message; an answer holds assistant messages only",
        ),
    ];
    let pair_cases =
        cases.iter().map(|c| ("dpo", r#"{"prompt":"q","chosen":"yes","rejected":"no"}"#, c));
    let kto_cases =
        kto_cases.iter().map(|c| ("kto", r#"{"prompt":"q","completion":"yes","label":true}"#, c));
    for (objective, good, &(bad, want)) in pair_cases.chain(kto_cases) {
        let text = format!("{good}\n{bad}\n");
        std::fs::write(dir.path().join("train.jsonl"), text).unwrap();
        let d = dir.path().to_str().unwrap();
        let o = whet(&args(d, out_s, objective, "2"), "");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{bad}: {err}");
        assert!(err.contains(want), "{bad}: want `{want}` in {err}");
        assert!(!err.contains("panicked") && !out.exists(), "{err}");
        let o = whet(&["data", "check", "--model", "random:tiny", d], "");
        assert!(stderr(&o).contains(want), "data check: {}", stderr(&o));
    }

    // Answers for a preference objective, pairs for SFT, and settings of another objective.
    let sft = tempfile::tempdir().unwrap();
    let sft_data = dataset(sft.path());
    let err = assert_one_line_error(&whet(&args(&sft_data, out_s, "dpo", "2"), ""));
    assert!(
        err.contains(
            "train.jsonl:1: a `chat` record, but --objective dpo trains on preference pairs"
        ),
        "{err}"
    );
    let p = pairs(dir.path());
    let err = assert_one_line_error(&whet(&args(&p, out_s, "sft", "2"), ""));
    assert!(
        err.contains("train.jsonl:1: a `preference` record, but --objective sft trains on answers"),
        "{err}"
    );
    let err = assert_one_line_error(&whet(&args(&p, out_s, "kto", "2"), ""));
    assert!(
        err.contains("train.jsonl:1: a `preference` record, but --objective kto trains on answers marked desirable or not"),
        "{err}"
    );
    let u = tempfile::tempdir().unwrap();
    let u = unpaired(u.path());
    for objective in ["dpo", "sft"] {
        let o = whet(&args(&u, out_s, objective, "2"), "");
        let err = assert_one_line_error(&o);
        assert!(err.contains("train.jsonl:1: a `unpaired` record, but --objective"), "{err}");
        assert!(stderr(&o).contains("--objective kto"), "{objective}: the hint names kto: {err}");
    }
    let mut a = args(&u, out_s, "kto", "2");
    let at = a.iter().position(|x| *x == "--batch-size").unwrap();
    a[at + 1] = "1";
    assert!(assert_one_line_error(&whet(&a, "")).contains("needs at least 2 rows a batch"));
    let mut a = args(&p, out_s, "dpo", "2");
    a.extend(["--desirable-weight", "2"]);
    assert!(assert_one_line_error(&whet(&a, ""))
        .contains("`desirable_weight` = `2`: has no meaning for --objective dpo"));
    let mut a = args(&p, out_s, "dpo", "2");
    a.push("--pack");
    assert!(assert_one_line_error(&whet(&a, "")).contains("pass --no-pack"));
    let mut a = args(&p, out_s, "dpo", "2");
    a.extend(["--gamma", "1"]);
    let err = assert_one_line_error(&whet(&a, ""));
    assert!(err.contains("`simpo_gamma` = `1`: has no meaning for --objective dpo"), "{err}");
    for (objective, value, want) in
        [("ipo", "1", "has no meaning for --objective ipo"), ("dpo", "-1", "must be 0 or more")]
    {
        let flag = format!("--rpo-alpha={value}");
        let mut a = args(&p, out_s, objective, "2");
        a.push(&flag);
        let err = assert_one_line_error(&whet(&a, ""));
        assert!(err.contains(&format!("`rpo_alpha` = `{value}`: {want}")), "{err}");
    }
    let mut a = args(&p, out_s, "orpo", "2");
    a.push("--precompute-ref");
    assert!(assert_one_line_error(&whet(&a, ""))
        .contains("`precompute_ref` = `true`: has no meaning for --objective orpo"));
    assert!(!out.exists(), "nothing written by a refused run");
}

#[test]
fn check_preview_and_prepare_understand_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let data = pairs(dir.path());
    std::fs::write(
        dir.path().join("train.jsonl"),
        std::fs::read_to_string(dir.path().join("train.jsonl")).unwrap()
            + r#"{"prompt":"same","chosen":"x","rejected":"x"}"#
            + "\n",
    )
    .unwrap();
    let o = whet(&["data", "check", "--model", "random:tiny", &data], "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("train (") && stdout(&o).contains("preference): 11 examples"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("chosen = rejected: 1"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("train.jsonl:11: `chosen` and `rejected` are the same answer"),
        "{}",
        stderr(&o)
    );
    let o = whet(&["data", "preview", "--model", "random:tiny", &data, "--count", "1"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("train.jsonl:1 (chosen)") && text.contains("train.jsonl:1 (rejected)"),
        "{text}"
    );
    assert!(text.contains("«good answer 0") && text.contains("«bad 0"), "{text}");
    // KTO's answers likewise: counted, previewed with their labels, prepared, trained.
    let u = tempfile::tempdir().unwrap();
    let kto = unpaired(u.path());
    let o = whet(&["data", "check", "--model", "random:tiny", &kto], "");
    assert!(stdout(&o).contains("unpaired): 12 examples"), "{}", stdout(&o));
    let o = whet(&["data", "preview", "--model", "random:tiny", &kto, "--count", "3"], "");
    let text = stdout(&o);
    assert!(text.contains("train.jsonl:1 (desirable)"), "{text}");
    assert!(text.contains("train.jsonl:3 (undesirable)") && text.contains("«bad 2"), "{text}");
    let prepared = u.path().join("prepared");
    let o = whet(
        &["data", "prepare", "--model", "random:tiny", &kto, "--out", prepared.to_str().unwrap()],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (u.path().join("a"), u.path().join("b"));
    assert!(whet(&args(&kto, a.to_str().unwrap(), "kto", "3"), "").status.success());
    let o = whet(&args(prepared.to_str().unwrap(), b.to_str().unwrap(), "kto", "3"), "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(a.join("adapter/adapter_model.safetensors")).unwrap(),
        std::fs::read(b.join("adapter/adapter_model.safetensors")).unwrap(),
        "KTO from the prepared answers (their labels kept) equals KTO from the files"
    );

    // Prepared once, the pairs train as from the files.
    let prepared = dir.path().join("prepared");
    let o = whet(
        &["data", "prepare", "--model", "random:tiny", &data, "--out", prepared.to_str().unwrap()],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    assert!(whet(&args(&data, a.to_str().unwrap(), "dpo", "3"), "").status.success());
    let o = whet(&args(prepared.to_str().unwrap(), b.to_str().unwrap(), "dpo", "3"), "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(a.join("adapter/adapter_model.safetensors")).unwrap(),
        std::fs::read(b.join("adapter/adapter_model.safetensors")).unwrap()
    );
}

/// The chosen answers of [`pairs`] as an SFT set in `dir`: what the SFT step of SFT -> DPO
/// trains on.
fn sft_of_pairs(dir: &Path) -> String {
    let line = |i: usize| {
        serde_json::json!({"messages": [
            {"role": "user", "content": format!("q{i}")},
            {"role": "assistant", "content": format!("good answer {}", i % 3)},
        ]})
        .to_string()
    };
    let text = |r: std::ops::Range<usize>| r.map(|i| line(i) + "\n").collect::<String>();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("train.jsonl"), text(0..10)).unwrap();
    std::fs::write(dir.join("valid.jsonl"), text(10..12)).unwrap();
    dir.to_str().unwrap().to_string()
}

#[test]
fn dpo_continues_an_sft_adapter_against_a_frozen_copy_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = pairs(dir.path());
    let sft_data = sft_of_pairs(&dir.path().join("sft-data"));
    let sft = dir.path().join("sft");
    let mut a = args(&sft_data, sft.to_str().unwrap(), "sft", "15");
    a.extend(["--rank", "4", "--alpha", "8"]);
    let o = whet(&a, "");
    assert!(o.status.success(), "{}", stderr(&o));
    let init = sft.join("adapter");
    let init_s = init.to_str().unwrap();

    // DPO from the SFT adapter: its rank and alpha without flags, and a reference that is the
    // SFT adapter itself, so the first step's loss is ln 2 with zero rewards although the
    // policy is not the base.
    let run = dir.path().join("dpo");
    let mut a = args(&data, run.to_str().unwrap(), "dpo", "12");
    a.extend(["--init-adapter", init_s]);
    let o = whet(&a, "");
    assert!(o.status.success(), "{}", stderr(&o));
    let m = metrics(&run);
    let get = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    assert!((get(&m[0], "loss") - std::f64::consts::LN_2).abs() < 1e-4, "{}", m[0]);
    assert!(get(&m[0], "rewards/margins").abs() < 1e-6, "{}", m[0]);
    let steps: Vec<_> = m.iter().filter(|v| v.get("loss").is_some()).collect();
    assert!(get(steps[11], "rewards/margins") > 0.0, "{}", steps[11]);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!((config["r"].as_u64(), config["lora_alpha"].as_f64()), (Some(4), Some(8.0)));
    // The policy started from the SFT adapter, not from a fresh one: its log-probabilities of
    // the chosen answers at step 0 are the SFT adapter's, higher than the base's.
    let plain = dir.path().join("plain");
    let o = whet(&args(&data, plain.to_str().unwrap(), "dpo", "1"), "");
    assert!(o.status.success(), "{}", stderr(&o));
    let base_logp = get(&metrics(&plain)[0], "logps/chosen");
    assert!(get(&m[0], "logps/chosen") > base_logp + 1.0, "{} vs {base_logp}", m[0]);
    assert!(std::fs::read_to_string(run.join("whet.toml")).unwrap().contains("init_adapter"));

    // A flag that contradicts the adapter is refused, not overridden.
    let x = dir.path().join("x");
    let x = x.to_str().unwrap();
    let mut a = args(&data, x, "dpo", "2");
    a.extend(["--init-adapter", init_s, "--rank", "8"]);
    let e = assert_one_line_error(&whet(&a, ""));
    assert!(e.contains("--rank 8") && e.contains("r = 4"), "{e}");
    // Adapters whet cannot train on as one rank over named modules, by the field.
    for (fixture, field) in [
        ("patterns", "rank_pattern"),
        ("layers", "layers_to_transform"),
        ("regex", "target_modules"),
    ] {
        let p = root().join("tests/fixtures/adapters").join(fixture);
        let mut a = args(&data, x, "dpo", "2");
        a.extend(["--init-adapter", p.to_str().unwrap()]);
        let e = assert_one_line_error(&whet(&a, ""));
        assert!(e.contains(field) && e.contains("adapter_config.json"), "{fixture}: {e}");
    }
    let mut a = args(&data, x, "dpo", "2");
    a.extend(["--init-adapter", "/nonexistent/adapter"]);
    let e = assert_one_line_error(&whet(&a, ""));
    assert!(e.contains("/nonexistent/adapter"), "{e}");
    assert!(!dir.path().join("x").exists(), "nothing written for a refused run");

    // A resume must start from the same adapter: the reference is a copy of it.
    std::fs::copy(
        run.join("adapter/adapter_model.safetensors"),
        init.join("adapter_model.safetensors"),
    )
    .unwrap();
    let o = whet(&["train", "--out", run.to_str().unwrap(), "--resume"], "");
    let e = assert_error_after_progress(&o);
    assert!(
        e.contains("--init-adapter") && e.contains("not the adapter the run started from"),
        "{e}"
    );
}

#[test]
fn eval_on_pairs_reports_preference_accuracy_against_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let data = pairs(dir.path());
    let run = dir.path().join("dpo");
    let o = whet(&args(&data, run.to_str().unwrap(), "dpo", "30"), "");
    assert!(o.status.success(), "{}", stderr(&o));
    let adapter = run.join("adapter");
    let train = dir.path().join("train.jsonl");
    // The same pairs with chosen and rejected swapped.
    let swapped = dir.path().join("swapped.jsonl");
    let text: String = std::fs::read_to_string(&train)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let c = v["chosen"].take();
            v["chosen"] = v["rejected"].take();
            v["rejected"] = c;
            v.to_string() + "\n"
        })
        .collect();
    std::fs::write(&swapped, text).unwrap();
    let out = dir.path().join("report");
    let eval = |file: &Path, extra: &[&str]| {
        let base = ["eval", "--model", "random:tiny", "--data", file.to_str().unwrap()];
        whet(&[&base[..], extra].concat(), "")
    };
    let accuracy = |o: &std::process::Output| -> f64 {
        let s = stdout(o);
        let line = s
            .lines()
            .find(|l| l.starts_with("preference accuracy:"))
            .unwrap_or_else(|| panic!("{s}"));
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    let o = eval(&train, &["--adapter", adapter.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(accuracy(&o) >= 0.9, "DPO learned its training pairs: {}", stdout(&o));
    assert!(stdout(&o).contains("(10 pairs)"), "{}", stdout(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let acc = &r["preference_accuracy"];
    assert!(acc["ci95"][0].as_f64().unwrap() <= acc["mean"].as_f64().unwrap(), "{r}");
    assert_eq!(r["pairs"], 10);
    let o = eval(&swapped, &["--adapter", adapter.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(accuracy(&o) <= 0.1, "swapped pairs: {}", stdout(&o));
    // Against itself as the reference, an adapter raises nothing: every margin is 0.
    let a = adapter.to_str().unwrap();
    let o = eval(&train, &["--adapter", a, "--reference-adapter", a]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(accuracy(&o), 0.0, "{}", stdout(&o));
    assert!(stdout(&o).contains("reward margin:       0.000"), "{}", stdout(&o));
    assert!(stdout(&o).contains(&format!("against the base with {a}")), "{}", stdout(&o));
    // Without an adapter there is nothing to weigh against the base: the model's own
    // preference is shown, and said to be that.
    let o = eval(&train, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("prefers chosen:") && stdout(&o).contains("no --adapter"),
        "{}",
        stdout(&o)
    );
    // Settings of generated answers do not apply to pairs.
    let e = assert_one_line_error(&eval(&train, &["--shots", "2"]));
    assert!(e.contains("--shots") && e.contains("preference pairs"), "{e}");
}

/// An SFT set of `n` questions with `rules.toml` beside it, in `dir`.
fn sft_with_rules(dir: &Path, n: usize) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let text: String = (0..n)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": format!("question {i}")},
                {"role": "assistant", "content": format!("Thanks for asking. Answer {i}.")},
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join("train.jsonl"), &text).unwrap();
    std::fs::write(
        dir.join("valid.jsonl"),
        text.lines().take(2).collect::<Vec<_>>().join("\n") + "\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("rules.toml"),
        "[[rule]]\nname = \"thanks\"\nmust_match = \"^Thanks\"\n",
    )
    .unwrap();
    dir.to_str().unwrap().to_string()
}

#[test]
fn data_pairs_turns_an_sft_set_into_pairs_with_the_models_own_answers_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let data = sft_with_rules(&dir.path().join("sft"), 6);
    let out = dir.path().join("pairs");
    let pairs_cmd = |out: &Path, extra: &[&str]| {
        let base = [
            "data",
            "pairs",
            &data,
            "--model",
            "random:tiny",
            "--out",
            out.to_str().unwrap(),
            "--max-tokens",
            "6",
        ];
        whet(&[&base[..], extra].concat(), "")
    };
    let o = pairs_cmd(&out, &["--only-failing"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("train: 6 examples -> 6 pairs"), "{}", stdout(&o));
    assert!(stdout(&o).contains("valid: 2 examples -> 2 pairs"), "{}", stdout(&o));
    let text = std::fs::read_to_string(out.join("train.jsonl")).unwrap();
    let records: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["prompt"][0]["role"], "system", "{r}");
        assert_eq!(r["prompt"][1]["content"], format!("question {i}"), "{r}");
        assert_eq!(r["chosen"][0]["content"], format!("Thanks for asking. Answer {i}."), "{r}");
        let rejected = r["rejected"][0]["content"].as_str().unwrap();
        assert!(!rejected.is_empty() && !rejected.starts_with("Thanks"), "{r}");
    }
    // Seeded: the same command writes the same pairs; another seed, other answers.
    let again = dir.path().join("again");
    assert!(pairs_cmd(&again, &["--only-failing"]).status.success());
    assert_eq!(text, std::fs::read_to_string(again.join("train.jsonl")).unwrap());
    let other = dir.path().join("other");
    assert!(pairs_cmd(&other, &["--seed", "7"]).status.success());
    assert_ne!(text, std::fs::read_to_string(other.join("train.jsonl")).unwrap());
    // The pairs are preference data whet reads, and DPO trains on them.
    let o = whet(&["data", "check", out.to_str().unwrap(), "--model", "random:tiny"], "");
    assert!(o.status.success() && stdout(&o).contains("pairs: 6"), "{}{}", stdout(&o), stderr(&o));
    let run = dir.path().join("dpo");
    let o = whet(&args(out.to_str().unwrap(), run.to_str().unwrap(), "dpo", "2"), "");
    assert!(o.status.success(), "{}", stderr(&o));
    // A filter every answer passes leaves no pairs: an error, and nothing written.
    let none = dir.path().join("none");
    let e = assert_error_after_progress(&pairs_cmd(
        &none,
        &["--only-failing", "--metric", "chrf", "--threshold", "0"],
    ));
    assert!(e.contains("no pairs"), "{e}");
    assert!(!none.exists());
    // A record without an answer is named by file and line before the model loads.
    std::fs::write(
        Path::new(&data).join("valid.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n",
    )
    .unwrap();
    let e = assert_one_line_error(&pairs_cmd(&dir.path().join("bad"), &[]));
    assert!(e.contains("valid.jsonl:1"), "{e}");
    assert!(!dir.path().join("bad").exists());
}

/// The example preference set in data/ is pairs whet reads, each of two different answers,
/// the chosen one in the house style (its sign-off).
#[test]
fn the_example_pairs_are_preference_data_whet_reads() {
    let model = root().join("tests/fixtures/families/llama3");
    let dir = root().join("data/support-style-pairs");
    let o = whet(&["data", "check", dir.to_str().unwrap(), "--model", model.to_str().unwrap()], "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("pairs: 35") && stdout(&o).contains("pairs: 5"), "{}", stdout(&o));
    for line in std::fs::read_to_string(dir.join("train.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (c, r) = (
            v["chosen"][0]["content"].as_str().unwrap(),
            v["rejected"][0]["content"].as_str().unwrap(),
        );
        assert!(c.ends_with("— Fjord Outfitters Support") && c != r, "{line}");
    }
}
