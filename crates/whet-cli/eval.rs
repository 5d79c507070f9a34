//! `whet eval` and `whet compare`: load the models, hand them to whet-eval, print the table and
//! write the reports.

use crate::args::{CompareArgs, EvalArgs, EvalShared};
use crate::model;
use crate::output::{Output, Shape};
use anyhow::{bail, Context, Result};
use whet_eval::compare::{self, CompareConfig};
use whet_eval::run::{Model, Prompting, RunSettings};

fn settings(s: &EvalShared) -> Result<RunSettings> {
    anyhow::ensure!(
        s.max_tokens > 0 && s.max_batch > 0,
        "--max-tokens and --max-batch must be positive"
    );
    anyhow::ensure!(s.limit != Some(0), "--limit 0 leaves no test example to score");
    model::check_sampling(s.temperature, s.top_p)?;
    Ok(RunSettings {
        max_tokens: s.max_tokens,
        seeds: s.seeds,
        sampling: whet_infer::SamplingConfig {
            temperature: s.temperature,
            top_p: s.top_p,
            ..Default::default()
        },
        latency_samples: s.latency_samples,
        max_batch: s.max_batch,
        bootstrap_seed: s.seed,
        resamples: 1000,
        reference_loss: true,
    })
}

fn system_prompt(s: &EvalShared) -> Result<Option<String>> {
    match &s.system_prompt_file {
        Some(f) => Ok(Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read --system-prompt-file {}", f.display()))?
                .trim()
                .to_string(),
        )),
        None => Ok(s.system_prompt.clone()),
    }
}

fn into_model(m: whet_model::LoadedModel) -> Result<Model> {
    let template = whet_infer::chat_template(&m.tokenizer)?;
    Ok(Model { model: m.model, tokenizer: m.tokenizer, template, source: m.source })
}

/// `--out`, checked before any work: the report directory, never one of `inputs` nor a
/// directory that `whet COMMAND` did not write.
fn plan_out(
    s: &EvalShared,
    command: &'static str,
    mut inputs: Vec<(&'static str, std::path::PathBuf)>,
) -> Result<Option<Output>> {
    let Some(out) = &s.out else { return Ok(None) };
    inputs.push(("--data", s.data.clone()));
    if let Some(f) = &s.system_prompt_file {
        inputs.push(("--system-prompt-file", f.clone()));
    }
    let inputs: Vec<(&str, &std::path::Path)> =
        inputs.iter().map(|(f, p)| (*f, p.as_path())).collect();
    Output::plan(out, Shape::Dir, command, s.overwrite, &inputs).map(Some)
}

/// The data directory and test file `--data` names.
fn data_paths(data: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    if data.is_dir() {
        (data.to_path_buf(), data.join("test.jsonl"))
    } else {
        (data.parent().unwrap_or(std::path::Path::new(".")).to_path_buf(), data.to_path_buf())
    }
}

/// Whether the first record of `path` is a preference pair (`chosen` and `rejected`).
fn holds_pairs(path: &std::path::Path) -> bool {
    use std::io::BufRead;
    let Ok(file) = std::fs::File::open(path) else { return false };
    let first = std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&first)
        .is_ok_and(|v| v.get("chosen").is_some() && v.get("rejected").is_some())
}

/// `whet eval` on preference pairs: how often the model (its adapters against the bare base,
/// as DPO's implicit reward has it) prefers the chosen answer, with a bootstrap interval.
fn eval_pairs(args: &EvalArgs, test_path: &std::path::Path) -> Result<()> {
    let out = plan_out(&args.shared, "eval", model::input_paths(&args.model))?;
    for (flag, set) in [
        (
            "--system-prompt",
            args.shared.system_prompt.is_some() || args.shared.system_prompt_file.is_some(),
        ),
        ("--shots", args.shots > 0),
        ("--metric", !args.shared.metric.is_empty()),
    ] {
        anyhow::ensure!(
            !set,
            "{flag}: {} holds preference pairs, which whet eval scores by the answers' log-probabilities, not by generated answers",
            test_path.display()
        );
    }
    // Unmerged: the reference is the same model with every adapter switched off, or with only
    // --reference-adapter on.
    let (mut m, device) = model::load_with(&args.model, 0, false)?;
    let weights = m.model.adapter_weights();
    const REFERENCE: &str = "reference";
    if let Some(dir) = &args.reference_adapter {
        anyhow::ensure!(
            !weights.is_empty(),
            "--reference-adapter {}: there is no --adapter to weigh against it",
            dir.display()
        );
        whet_model::adapter::load_named_adapter(&mut m.model, REFERENCE, 0.0, dir)
            .with_context(|| format!("cannot apply the adapter in {}", dir.display()))?;
    }
    let defaults = whet_train::TrainConfig::default();
    let data = crate::args::DataArgs {
        path: test_path.to_path_buf(),
        model: args.model.model.clone(),
        shape: crate::args::ShapeArgs {
            format: Some(whet_data::FormatChoice::Preference),
            overlong: Some(defaults.overlong),
        },
        template: crate::args::TemplateArgs { template_var: vec![] },
        train_on: defaults.train_on,
        max_seq_len: defaults.max_seq_len.min(m.model.config().max_position_embeddings),
        valid_fraction: 0.0,
        seed: 0,
    };
    let text = crate::data::ModelText::from_tokenizer(m.tokenizer.clone(), &[])?;
    let (_, splits) = crate::data::run_pipeline(&data, &text)?;
    let mut pairs: Vec<whet_data::Tokenized> =
        splits.into_iter().flat_map(|s| s.examples).collect();
    if let Some(n) = args.shared.limit {
        pairs.truncate(n);
    }
    anyhow::ensure!(!pairs.is_empty(), "{}: no preference pairs", test_path.display());
    let batch = (args.shared.max_batch / 2).max(1);
    let policy = whet_train::pair_logps(&m.model, &pairs, batch, &device)?;
    let (b_seed, resamples) = (args.shared.seed, 2000);
    let alone: Vec<f64> = policy.iter().map(|(c, r)| f64::from(c > r)).collect();
    let alone = whet_eval::metrics::bootstrap(&alone, b_seed, resamples);
    let mut out_json = serde_json::json!({
        "data": test_path.display().to_string(), "pairs": pairs.len(), "model": m.source,
        "adapters": weights.iter().map(|(n, w)| serde_json::json!({"name": n, "weight": w})).collect::<Vec<_>>(),
        "model_prefers_chosen": alone,
    });
    println!("model:       {}", m.source);
    println!("data:        {} ({} pairs)", test_path.display(), pairs.len());
    let ci = |e: &whet_eval::metrics::Estimate| {
        format!("{:.3}  [{:.3}, {:.3}] (95% bootstrap)", e.mean, e.ci95[0], e.ci95[1])
    };
    if weights.is_empty() {
        println!("prefers chosen:      {}  (chosen more likely than rejected)", ci(&alone));
        println!("note: no --adapter: preference accuracy weighs an adapter against its base");
    } else {
        let against = match &args.reference_adapter {
            Some(dir) => {
                m.model.set_adapter_weights(&[(REFERENCE, 1.0)])?;
                format!("the base with {}", dir.display())
            }
            None => {
                m.model.set_adapter_weights(&[])?;
                "the base".to_string()
            }
        };
        let reference = whet_train::pair_logps(&m.model, &pairs, batch, &device)?;
        let margins: Vec<f64> = policy
            .iter()
            .zip(&reference)
            .map(|((pc, pr), (rc, rr))| (pc - rc) - (pr - rr))
            .collect();
        let accurate: Vec<f64> = margins.iter().map(|m| f64::from(*m > 0.0)).collect();
        let accuracy = whet_eval::metrics::bootstrap(&accurate, b_seed, resamples);
        let margin = whet_eval::metrics::bootstrap(&margins, b_seed, resamples);
        println!("preference accuracy: {}", ci(&accuracy));
        println!("  pairs where the adapters raise the chosen answer's log-probability over the rejected one's, against {against} (DPO's rewards/accuracies)");
        println!("reward margin:       {} nats (beta = 1)", ci(&margin));
        println!(
            "prefers chosen:      {}  (with the adapters, chosen more likely than rejected)",
            ci(&alone)
        );
        out_json["reference"] = against.into();
        out_json["preference_accuracy"] = serde_json::to_value(accuracy)?;
        out_json["reward_margin_nats"] = serde_json::to_value(margin)?;
    }
    if let Some(out) = out {
        let dir = out.staging()?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&out_json)? + "\n")?;
        eprintln!("wrote {}", out.commit()?.display());
    }
    Ok(())
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let (dir, test_path) = data_paths(&args.shared.data);
    if holds_pairs(&test_path) {
        return eval_pairs(&args, &test_path);
    }
    if let Some(r) = &args.reference_adapter {
        bail!(
            "--reference-adapter {}: {} holds no preference pairs; a reference model weighs pairs only",
            r.display(),
            test_path.display()
        );
    }
    let run = settings(&args.shared)?;
    let out = plan_out(&args.shared, "eval", model::input_paths(&args.model))?;
    let system = system_prompt(&args.shared)?;
    let mut test = whet_eval::read_examples(&test_path)?;
    if let Some(n) = args.shared.limit {
        test.truncate(n);
    }
    let shots = if args.shots > 0 {
        compare::draw_shots(
            &whet_eval::read_examples(&dir.join("train.jsonl"))?,
            args.shots,
            args.shared.seed,
        )?
    } else {
        vec![]
    };
    let rules_path = dir.join("rules.toml");
    let rules =
        rules_path.is_file().then(|| whet_eval::rules::Rules::read(&rules_path)).transpose()?;
    // Labels repeat over the training data too, when it is there.
    let train = dir.join("train.jsonl");
    let mut references: Vec<String> = test.iter().map(|e| e.reference.clone()).collect();
    if train.is_file() {
        references.extend(whet_eval::read_examples(&train)?.into_iter().map(|e| e.reference));
    }
    let task = whet_eval::Task::detect(&references);
    let metrics = whet_eval::choose_metrics(&args.shared.metric, task, rules.as_ref())?;
    let (m, _device) = model::load(&args.model, 0)?;
    let m = into_model(m)?;
    let adapters = m.model.adapter_weights();
    let prompting = Prompting { adapters, system: system.clone(), shots };
    let result =
        whet_eval::run::run_arm(&m, &prompting, &test, task, &metrics, rules.as_ref(), &run)?;
    let arm = compare::Arm {
        name: "model".into(),
        kind: if args.model.adapter.is_empty() { "prompted" } else { "finetuned" },
        shots: args.shots,
        model: m.source.clone(),
        chosen: false,
        adapter: None,
        training: None,
        draws: None,
        valid_score: None,
        cost_per_1m_queries: None,
        machine_hours_per_1m_queries: result.secs_per_query * 1e6 / 3600.0,
        result,
    };
    let report = compare::Report {
        verdict: String::new(),
        settings: serde_json::json!({
            "task": task, "metrics": metrics, "data": test_path.display().to_string(),
            "test_examples": test.len(), "limit": args.shared.limit, "model": m.source, "system_prompt": system,
            "shots": args.shots, "seed": args.shared.seed, "seeds": args.shared.seeds,
        }),
        training: None,
        warnings: vec![],
        learning_curve: None,
        arms: vec![arm],
    };
    let a = &report.arms[0].result;
    println!("model:       {}", m.source);
    println!("data:        {} ({} examples, task: {task:?})", test_path.display(), test.len());
    for (name, e) in &a.metrics {
        println!("{name:<12} {:.3}  [{:.3}, {:.3}] (95% bootstrap)", e.mean, e.ci95[0], e.ci95[1]);
    }
    if let Some(c) = &a.classification {
        println!("macro F1:    {:.3}", c.macro_f1);
        for (label, s) in &c.per_label {
            println!(
                "  {label:<20} precision {:.2}  recall {:.2}  F1 {:.2}  ({} examples)",
                s.precision, s.recall, s.f1, s.support
            );
        }
    }
    for (rule, rate) in &a.rules {
        println!("rule {rule:<15} {:.0}% of answers", rate * 100.0);
    }
    if let (Some(l), Some(p)) = (a.reference_loss, a.perplexity) {
        println!("test loss:   {l:.3} (perplexity {p:.2}) on the reference answers");
    }
    if let Some(s) = a.consistency.seeds {
        println!(
            "consistency: {:.0}% agreement across {} sampled runs",
            s * 100.0,
            args.shared.seeds
        );
    }
    if let Some(g) = a.consistency.groups {
        println!("consistency: {:.0}% agreement within paraphrase groups", g * 100.0);
    }
    println!("prompt:      {:.0} tokens per query", a.prompt_tokens_per_query);
    if args.shared.latency_samples > 0 {
        let l = &a.latency_ms;
        println!(
            "latency:     {:.0} ms median, {:.0} ms p95 (first token {:.0} ms)",
            l.total_p50, l.total_p95, l.ttft_p50
        );
    }
    if let Some(out) = out {
        whet_eval::report::write(&report, out.staging()?)?;
        eprintln!("wrote {}", out.commit()?.display());
    }
    Ok(())
}

/// `--adapter` values of `whet compare`: a lone `DIR` is the arm `fine-tuned`; several need
/// a `NAME=` each, which names their arms.
fn compare_adapters(values: &[String]) -> Result<Vec<(String, std::path::PathBuf)>> {
    let mut out: Vec<(String, std::path::PathBuf)> = vec![];
    for v in values {
        let spec = model::AdapterSpec::parse(v)?;
        anyhow::ensure!(
            spec.weight.is_none(),
            "--adapter `{v}`: whet compare runs each adapter at weight 1 (NAME=DIR, no :WEIGHT)"
        );
        let name = match spec.name {
            Some(n) => n,
            None if values.len() == 1 => "fine-tuned".to_string(),
            None => bail!(
                "--adapter `{v}`: with several adapters each needs a name\nhint: --adapter sft={v}"
            ),
        };
        anyhow::ensure!(
            !out.iter().any(|(n, _)| *n == name),
            "--adapter `{v}`: two adapters are named `{name}`"
        );
        out.push((name, spec.dir));
    }
    Ok(out)
}

pub fn compare(args: CompareArgs) -> Result<()> {
    let run = settings(&args.shared)?;
    let adapters = compare_adapters(&args.adapter)?;
    let mut inputs: Vec<(&'static str, std::path::PathBuf)> =
        adapters.iter().map(|(_, d)| ("--adapter", d.clone())).collect();
    for m in [&args.model, &args.baseline_model].into_iter().flatten() {
        if std::path::Path::new(m).exists() {
            inputs.push(("--model", m.into()));
        }
    }
    let sizes = curve_sizes(&args)?;
    let out = plan_out(&args.shared, "compare", inputs)?;
    let system = system_prompt(&args.shared)?;
    anyhow::ensure!(
        args.shared.data.is_dir(),
        "--data {}: whet compare needs a directory with train.jsonl, valid.jsonl and test.jsonl",
        args.shared.data.display()
    );
    let device = args.device.open()?;
    let dtype = args.dtype.dtype();
    let spec = model::model_spec(&args.model);
    let quantize = args.quantize.map(whet_model::Quantization::ggml);
    let quantized = |mut m: whet_model::LoadedModel| -> Result<whet_model::LoadedModel> {
        if let Some(q) = quantize {
            m.model.quantize(q).context("cannot quantize the model")?;
            m.source = format!("{}, linear layers quantized to {q:?}", m.source);
        }
        Ok(m)
    };
    let mut base = model::load_spec(&spec, dtype, &device, 0)?;
    for (name, dir) in &adapters {
        whet_model::adapter::load_named_adapter(&mut base.model, name, 1.0, dir)
            .with_context(|| format!("cannot apply the adapter in {}", dir.display()))?;
    }
    base.model.set_adapter_weights(&[])?;
    let base = into_model(quantized(base)?)?;
    let baseline = match &args.baseline_model {
        Some(b) => Some(into_model(quantized(model::load_spec(b, dtype, &device, 0)?)?)?),
        None => None,
    };
    let cfg = CompareConfig {
        data: args.shared.data.clone(),
        system_prompt: system,
        shots: args.shots.clone(),
        shot_draws: args.shot_draws,
        seed: args.shared.seed,
        metrics: args.shared.metric.clone(),
        price_per_1k_tokens: args.price_per_1k_tokens,
        adapters,
        limit: args.shared.limit,
        run,
    };
    let start = std::time::Instant::now();
    let mut progress = |what: &str| {
        eprintln!("compare: {what} ({:.0} s in)", start.elapsed().as_secs_f64());
    };
    let mut report = compare::compare(&base, baseline.as_ref(), &cfg, &mut progress)?;
    if !sizes.is_empty() {
        let staging = out.as_ref().context("--learning-curve needs --out")?.staging()?;
        let points = learning_curve(&args, &cfg, &spec, &sizes, staging)?;
        report.learning_curve = compare::LearningCurve::new(points, &report);
    }
    print!("{}", whet_eval::report::table(&report));
    println!("\n{}", report.verdict);
    if let Some(out) = out {
        whet_eval::report::write(&report, out.staging()?)?;
        let out = out.commit()?;
        eprintln!("wrote {}/report.{{md,html,json}}, metric.svg, latency.svg", out.display());
    }
    Ok(())
}

/// `--learning-curve` sizes; `all` is the whole training set. Checked before any work.
fn curve_sizes(args: &CompareArgs) -> Result<Vec<String>> {
    for s in &args.learning_curve {
        anyhow::ensure!(
            s == "all" || s.parse::<usize>().is_ok_and(|n| n > 0),
            "--learning-curve `{s}`: give positive numbers of examples or `all`"
        );
    }
    Ok(args.learning_curve.clone())
}

/// Train one adapter per size on the first N training examples (shuffled by --seed), with the
/// settings of the adapter's own run, and score each.
fn learning_curve(
    args: &CompareArgs,
    cfg: &CompareConfig,
    spec: &str,
    sizes: &[String],
    out: &std::path::Path,
) -> Result<Vec<(usize, whet_eval::metrics::Estimate)>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let train_path = cfg.data.join("train.jsonl");
    let text = std::fs::read_to_string(&train_path)
        .with_context(|| format!("cannot read {}", train_path.display()))?;
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed));
    let saved = cfg.adapters[0].1.parent().map(|run| run.join("whet.toml")).filter(|p| p.is_file());
    let base_cfg = match &saved {
        Some(p) => whet_train::TrainConfig::from_file_with_steps(p)?.0,
        None => whet_train::TrainConfig::default(),
    };
    let mut points = vec![];
    let mut seen = std::collections::BTreeSet::new();
    for size in sizes {
        let n = if size == "all" { lines.len() } else { size.parse::<usize>()?.min(lines.len()) };
        if !seen.insert(n) {
            continue;
        }
        let dir = out.join("learning-curve").join(n.to_string());
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        std::fs::write(data.join("train.jsonl"), lines[..n].join("\n") + "\n")?;
        if cfg.data.join("valid.jsonl").is_file() {
            std::fs::copy(cfg.data.join("valid.jsonl"), data.join("valid.jsonl"))?;
        }
        let mut c = base_cfg.clone();
        c.model = spec.to_string();
        c.data = data.display().to_string();
        c.device = args.device.clone();
        c.dtype = args.dtype.clone();
        eprintln!("learning curve: training on {n} examples ({} steps) ...", c.steps);
        let adapter = crate::train::train_quietly(c, &dir.join("run"))?;
        let device = args.device.open()?;
        let dtype = args.dtype.dtype();
        let mut m = model::load_spec(spec, dtype, &device, 0)?;
        whet_model::adapter::load_named_adapter(&mut m.model, "finetuned", 1.0, &adapter)?;
        m.model.set_adapter_weights(&[])?;
        // Scored as the other arms are: on the same quantized base.
        if let Some(q) = args.quantize.map(whet_model::Quantization::ggml) {
            m.model.quantize(q).context("cannot quantize the model")?;
        }
        let e = compare::score_finetuned(&into_model(m)?, "finetuned", cfg)?;
        eprintln!(
            "learning curve: {n} examples: {:.3} [{:.3}, {:.3}]",
            e.mean, e.ci95[0], e.ci95[1]
        );
        points.push((n, e));
    }
    Ok(points)
}

pub fn bench(args: crate::args::BenchEvalArgs) -> Result<()> {
    anyhow::ensure!(
        args.repeat > 0 && args.max_tokens > 0 && args.max_batch > 0,
        "--repeat, --max-tokens and --max-batch must be positive"
    );
    let load_before = whet_infer::bench::load_average();
    let (_, test_path) = data_paths(&args.data);
    let once = whet_eval::read_examples(&test_path)?;
    let test: Vec<_> = (0..args.repeat).flat_map(|_| once.iter().cloned()).collect();
    let references: Vec<String> = once.iter().map(|e| e.reference.clone()).collect();
    let task = whet_eval::Task::detect(&references);
    let metrics = whet_eval::choose_metrics(&[], task, None)?;
    let (m, device) = model::load(&args.model, 0)?;
    let m = into_model(m)?;
    let prompting = Prompting { adapters: m.model.adapter_weights(), ..Default::default() };
    let run = RunSettings {
        max_tokens: args.max_tokens,
        seeds: 0,
        sampling: Default::default(),
        latency_samples: 0,
        max_batch: args.max_batch,
        bootstrap_seed: 0,
        resamples: 10,
        reference_loss: false,
    };
    let start = std::time::Instant::now();
    let r = whet_eval::run::run_arm(&m, &prompting, &test, task, &metrics, None, &run)?;
    let secs = start.elapsed().as_secs_f64();
    println!("model:      {}", m.source);
    println!("device:     {}", whet_model::device_name(&device));
    println!(
        "examples:   {} ({} x {}), batch up to {}, at most {} tokens each",
        test.len(),
        once.len(),
        args.repeat,
        args.max_batch,
        args.max_tokens
    );
    println!("scored:     {:.2} examples/s ({secs:.1} s)", test.len() as f64 / secs);
    println!(
        "tokens:     {:.0} prompt + {:.1} generated per example",
        r.prompt_tokens_per_query, r.completion_tokens_per_query
    );
    println!("{}", whet_infer::bench::load_line(load_before));
    Ok(())
}
