//! `whet eval` and `whet compare`: load the models, hand them to whet-eval, print the table and
//! write the reports.

use crate::args::{CompareArgs, EvalArgs, EvalShared};
use crate::model;
use crate::output::{Output, Shape};
use anyhow::{Context, Result};
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

pub fn eval(args: EvalArgs) -> Result<()> {
    let run = settings(&args.shared)?;
    let out = plan_out(&args.shared, "eval", model::input_paths(&args.model))?;
    let system = system_prompt(&args.shared)?;
    let (dir, test_path) = data_paths(&args.shared.data);
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

pub fn compare(args: CompareArgs) -> Result<()> {
    let run = settings(&args.shared)?;
    let mut inputs = vec![("--adapter", args.adapter.clone())];
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
    whet_model::adapter::load_named_adapter(&mut base.model, "finetuned", 1.0, &args.adapter)
        .with_context(|| format!("cannot apply the adapter in {}", args.adapter.display()))?;
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
        seed: args.shared.seed,
        metrics: args.shared.metric.clone(),
        price_per_1k_tokens: args.price_per_1k_tokens,
        adapter_dir: args.adapter.clone(),
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
    let saved = args.adapter.parent().map(|run| run.join("whet.toml")).filter(|p| p.is_file());
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
        let e = compare::score_finetuned(&into_model(m)?, cfg)?;
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
