//! `whet eval` and `whet compare` end to end on the tiny Llama 3 fixture with a PEFT adapter:
//! every report, its shape, and bad input.

use super::{assert_one_line_error, root, stderr, stdout, whet};
use serde_json::Value;
use std::path::Path;

/// A labels dataset: `n` examples per split over three intents.
fn labels_data(dir: &Path, test_label: &str) {
    let line = |q: &str, a: &str, group: Option<usize>| {
        let mut v = serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]});
        if let Some(g) = group {
            v["group"] = g.into();
        }
        v.to_string()
    };
    let labels = ["refund", "cancel", "other"];
    let split = |n: usize, last: &str| {
        (0..n)
            .map(|i| {
                let label = if i == n - 1 { last } else { labels[i % 3] };
                line(&format!("question {i} about {}", labels[i % 3]), label, Some(i / 2))
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    };
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("train.jsonl"), split(9, "refund")).unwrap();
    std::fs::write(dir.join("valid.jsonl"), split(4, "cancel")).unwrap();
    std::fs::write(dir.join("test.jsonl"), split(6, test_label)).unwrap();
}

fn fixture() -> (String, String) {
    let s = |p: &str| root().join(p).to_str().unwrap().to_string();
    (s("tests/fixtures/families/llama3"), s("tests/fixtures/adapters/regex"))
}

/// `whet compare --model FIXTURE --adapter regex --data DATA --out OUT EXTRA...`.
fn compare(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let (base, adapter) = fixture();
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let mut args =
        vec!["compare", "--model", &base, "--adapter", &adapter, "--data", d, "--out", o];
    args.extend(extra);
    whet(&args, "")
}

#[test]
fn compare_writes_every_report_with_arms_intervals_and_a_verdict() {
    let (base, _) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    labels_data(&data, "shipping");
    let out = tmp.path().join("report");
    let o = compare(
        &data,
        &out,
        &[
            "--system-prompt",
            "Answer with one label: refund, cancel or other.",
            "--shots",
            "0,2",
            "--seeds",
            "2",
            "--latency-samples",
            "1",
            "--max-tokens",
            "3",
            "--price-per-1k-tokens",
            "0.5",
            "--baseline-model",
            &base,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for step in ["prompted, 2-shot: 4 validation examples", "fine-tuned: 6 test examples"] {
        assert!(stderr(&o).contains(&format!("compare: {step}")), "{}", stderr(&o));
    }
    let table = stdout(&o);
    for arm in ["prompted, 0-shot", "prompted, 2-shot", "fine-tuned", "fine-tuned + prompt"] {
        assert!(table.contains(arm), "{table}");
    }
    for f in ["report.json", "report.md", "report.html", "metric.svg", "latency.svg"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let arms = r["arms"].as_array().unwrap();
    let kinds: Vec<&str> = arms.iter().map(|a| a["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["prompted", "prompted", "finetuned", "finetuned+prompt", "baseline"]);
    for a in arms {
        let acc = &a["metrics"]["accuracy"];
        assert!(acc["mean"].is_number(), "{}", a["metrics"]);
        let (mean, lo, hi) = (
            acc["mean"].as_f64().unwrap(),
            acc["ci95"][0].as_f64().unwrap(),
            acc["ci95"][1].as_f64().unwrap(),
        );
        assert!(lo <= mean && mean <= hi, "{a}");
        for k in ["ttft_p50", "ttft_p95", "total_p50", "total_p95"] {
            assert!(a["latency_ms"][k].as_f64().unwrap() > 0.0, "{k} in {a}");
        }
        assert!(
            a["consistency"]["seeds"].is_number() && a["consistency"]["groups"].is_number(),
            "{a}"
        );
        let tokens = a["prompt_tokens_per_query"].as_f64().unwrap()
            + a["completion_tokens_per_query"].as_f64().unwrap();
        assert!(
            (a["cost_per_1m_queries"].as_f64().unwrap() - tokens / 1000.0 * 0.5 * 1e6).abs() < 1e-6
        );
    }
    let tokens = |i: usize| arms[i]["prompt_tokens_per_query"].as_f64().unwrap();
    assert!(tokens(1) > tokens(0), "two shots make longer prompts");
    assert!(tokens(2) < tokens(0), "the fine-tuned arm has no system prompt");
    assert_eq!(arms.iter().filter(|a| a["chosen"] == true).count(), 1);
    let verdict = r["verdict"].as_str().unwrap();
    assert!(verdict.contains("the larger prompted"), "{verdict}");
    let chosen = arms.iter().find(|a| a["chosen"] == true).unwrap();
    assert_eq!(arms[4]["shots"], chosen["shots"], "the baseline is prompted like the chosen arm");
    assert_eq!(r["settings"]["task"], "labels");
    assert!(
        r["warnings"][0].as_str().unwrap().contains("never seen in training: shipping"),
        "{}",
        r["warnings"]
    );
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("<svg") && html.contains("Verdict") && !html.contains("<script"),
        "self-contained"
    );
    assert!(std::fs::read_to_string(out.join("report.md")).unwrap().contains("| fine-tuned |"));
}

#[test]
fn compare_tries_several_draws_of_the_shots_and_reports_their_spread() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    labels_data(&data, "refund");
    let out = tmp.path().join("report");
    let quick = ["--seeds", "0", "--latency-samples", "0", "--max-tokens", "3"];
    let o = compare(&data, &out, &[&quick[..], &["--shots", "0,2", "--shot-draws", "3"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    for draw in 1..=3 {
        let step = format!("compare: prompted, 2-shot, draw {draw}: 4 validation examples");
        assert!(stderr(&o).contains(&step), "{}", stderr(&o));
    }
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let arms = r["arms"].as_array().unwrap();
    assert!(arms[0].get("draws").is_none(), "0 shots: one draw");
    let d = &arms[1]["draws"];
    let scores: Vec<f64> =
        d["scores"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(scores.len(), 3);
    // The chosen draw is the best on validation, and the arm's validation score is its.
    let best = scores.iter().copied().fold(f64::MIN, f64::max);
    assert_eq!(arms[1]["valid_score"].as_f64().unwrap(), best);
    let seed = d["chosen_seed"].as_u64().unwrap() as usize;
    assert_eq!(scores[seed], best, "{d}");
    assert!(scores[..seed].iter().all(|s| *s < best), "ties keep the first draw: {d}");
    assert!(
        stdout(&o).contains("prompted, 2-shot: 3 draws of the shots on validation"),
        "{}",
        stdout(&o)
    );
    // Draws are chosen among on validation: without it, --shot-draws is refused.
    std::fs::remove_file(data.join("valid.jsonl")).unwrap();
    let e = assert_one_line_error(&compare(
        &data,
        &tmp.path().join("x"),
        &[&quick[..], &["--shot-draws", "2"]].concat(),
    ));
    assert!(e.contains("--shot-draws 2") && e.contains("valid.jsonl"), "{e}");
}

#[test]
fn compare_puts_several_adapters_side_by_side() {
    let (base, adapter) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    labels_data(&data, "refund");
    let out = tmp.path().join("report");
    let (sft, dpo) = (format!("sft={adapter}"), format!("dpo={adapter}"));
    let quick = ["--seeds", "0", "--latency-samples", "0", "--max-tokens", "3", "--shots", "0"];
    let run = |adapters: &[&str], out: &Path| {
        let mut a = vec!["compare", "--model", &base, "--data", data.to_str().unwrap()];
        for x in adapters {
            a.extend(["--adapter", x]);
        }
        a.extend(["--out", out.to_str().unwrap()]);
        whet(&[&a[..], &quick].concat(), "")
    };
    let o = run(&[&sft, &dpo], &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let arms = r["arms"].as_array().unwrap();
    let names: Vec<&str> = arms.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["prompted, 0-shot", "sft", "dpo"]);
    assert_eq!(arms[1]["adapter"], "sft");
    // The same adapter twice: the same answers, a paired difference of exactly 0.
    assert_eq!(arms[1]["outputs"], arms[2]["outputs"]);
    let verdict = r["verdict"].as_str().unwrap();
    assert!(verdict.contains("`dpo` against `sft` on accuracy: +0.000"), "{verdict}");
    assert_eq!(r["settings"]["adapters"][1]["name"], "dpo");
    // Several adapters need a name each, and different ones.
    let e = assert_one_line_error(&run(&[&adapter, &dpo], &tmp.path().join("x")));
    assert!(e.contains("each needs a name"), "{e}");
    let e = assert_one_line_error(&run(&[&sft, &sft], &tmp.path().join("x")));
    assert!(e.contains("two adapters are named `sft`"), "{e}");
}

#[test]
fn eval_scores_one_model_and_writes_its_report() {
    let (base, adapter) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    labels_data(&data, "refund");
    let out = tmp.path().join("eval");
    let (d, o_) = (data.to_str().unwrap(), out.to_str().unwrap());
    // `whet eval` on the fixture, quick settings, then `extra`.
    let eval = |extra: &[&str]| {
        let quick = ["--max-tokens", "3", "--seeds", "0", "--latency-samples", "0"];
        whet(&[&["eval", "--model", &base, "--data", d][..], &quick, extra].concat(), "")
    };
    let o = eval(&["--adapter", &adapter, "--out", o_]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    for key in ["accuracy", "exact_match", "macro F1:", "test loss:", "perplexity", "prompt:"] {
        assert!(s.contains(key), "{s}");
    }
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert!(r["arms"][0]["reference_loss"].as_f64().unwrap() > 0.0);
    assert!(r["arms"][0]["classification"]["confusion"].is_object());
    assert_eq!(r["arms"][0]["outputs"].as_array().unwrap().len(), 6);
    // --limit scores the first N test examples, and the report says so.
    let o = eval(&["--limit", "4", "--out", o_, "--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("(4 examples"), "{}", stdout(&o));
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["arms"][0]["outputs"].as_array().unwrap().len(), 4);
    assert_eq!(r["settings"]["limit"], 4);
    // A rules file makes rule adherence the first metric.
    std::fs::write(data.join("rules.toml"), "[[rule]]\nname = \"short\"\nmax_words = 50\n")
        .unwrap();
    let o = eval(&["--metric", "rules"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("rules        1.000"), "{}", stdout(&o));
}

#[test]
fn bad_eval_input_is_refused_in_one_line_and_writes_nothing() {
    let (base, adapter) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    labels_data(&data, "refund");
    let out = tmp.path().join("out");
    let d = data.to_str().unwrap().to_string();
    let o_ = out.to_str().unwrap().to_string();
    let compare = |extra: &[&str]| {
        compare(&data, &out, &[&["--seeds", "0", "--max-tokens", "2"], extra].concat())
    };
    let e = assert_one_line_error(&compare(&["--shots", "0,40"]));
    assert!(e.contains("--shots 40 is more than the 9"), "{e}");
    let e = assert_one_line_error(&compare(&["--limit", "0"]));
    assert!(e.contains("--limit 0"), "{e}");
    let e = assert_one_line_error(&compare(&["--metric", "bleu"]));
    assert!(e.contains("--metric `bleu`: not one of accuracy"), "{e}");
    std::fs::write(data.join("rules.toml"), "[[rule]]\nname = 3\n").unwrap();
    let e = assert_one_line_error(&compare(&[]));
    assert!(e.contains("rules.toml"), "{e}");
    std::fs::remove_file(data.join("rules.toml")).unwrap();
    // An adapter for another base: one tensor of another width.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::copy(
        Path::new(&adapter).join("adapter_config.json"),
        other.join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors = candle_core::safetensors::load(
        Path::new(&adapter).join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    tensors.insert(
        name.into(),
        candle_core::Tensor::zeros((3, 32), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
    );
    candle_core::safetensors::save(&tensors, other.join("adapter_model.safetensors")).unwrap();
    let o = whet(
        &[
            "compare",
            "--model",
            &base,
            "--adapter",
            other.to_str().unwrap(),
            "--data",
            &d,
            "--out",
            &o_,
        ],
        "",
    );
    let e = assert_one_line_error(&o);
    assert!(e.contains("q_proj.lora_A") && e.contains("32"), "another base's adapter: {e}");
    std::fs::write(
        data.join("test.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"no answer\"}]}\n",
    )
    .unwrap();
    let e = assert_one_line_error(&compare(&[]));
    assert!(e.contains("test.jsonl:1"), "{e}");
    assert!(!out.exists(), "nothing written after a failure");
}

#[test]
fn the_learning_curve_trains_on_growing_subsets() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    labels_data(&data, "refund");
    let out = tmp.path().join("report");
    let quick = ["--shots", "0", "--seeds", "0", "--latency-samples", "0", "--max-tokens", "2"];
    let o = compare(&data, &out, &[&quick[..], &["--learning-curve", "3,all"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let points = r["learning_curve"]["points"].as_array().unwrap();
    assert_eq!(points.iter().map(|p| p[0].as_u64().unwrap()).collect::<Vec<_>>(), [3, 9]);
    assert!(r["learning_curve"]["prompted"]["mean"].is_number());
    for n in [3, 9] {
        let run = out.join(format!("learning-curve/{n}"));
        assert!(run.join("run/adapter/adapter_config.json").is_file(), "adapter {n} kept");
        let lines = std::fs::read_to_string(run.join("data/train.jsonl")).unwrap().lines().count();
        assert_eq!(lines, n);
    }
    assert!(out.join("learning-curve.svg").is_file());
    assert!(std::fs::read_to_string(out.join("report.html")).unwrap().contains("Learning curve"));
    let o = compare(&data, &out, &["--learning-curve", "0"]);
    assert!(assert_one_line_error(&o).contains("--learning-curve `0`"));
}
