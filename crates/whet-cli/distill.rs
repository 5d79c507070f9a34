//! `whet distill`: a prompted teacher answers unlabelled inputs; the answers, voted on and
//! filtered, become a chat dataset for a small student.
//!
//! Every check runs before the teacher loads. The teacher's answers are appended, one line
//! per input, to a cache beside `--out` named after the settings that shape them (teacher,
//! prompt, shots, sampling), so a stopped run continues where it stopped and a run with the
//! same settings asks the teacher nothing again; the filters (labels, agreement, split) are
//! applied afterwards and may change freely.

use crate::args::DistillArgs;
use crate::output::{Output, Shape};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use whet_data::distill::{self, Dropped, Input};
use whet_infer::{chat_template, generate_forks, EngineConfig, GenerateConfig, Message};

/// The teacher's raw answers to one input, as the cache keeps them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Answers {
    id: String,
    answers: Vec<String>,
    /// OpenAI's finish reasons: `stop`, or `length` for an answer cut at --max-tokens.
    finish: Vec<String>,
}

pub fn run(a: DistillArgs) -> Result<()> {
    // Everything is checked before the teacher loads.
    let endpoint = endpoint(&a)?;
    let shares = distill::parse_split(&a.split).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(a.samples > 0, "--samples must be at least 1, got `0`");
    if a.samples > 1 && a.sampling.temperature == 0.0 {
        bail!(
            "--samples {} with greedy decoding asks the same question {} times for one answer\nhint: pass --temperature 0.7 (or so) with --samples",
            a.samples,
            a.samples
        );
    }
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.min_agreement),
        "--min-agreement must be in [0, 1], got `{}`",
        a.min_agreement
    );
    anyhow::ensure!(a.max_batch > 0, "--max-batch must be positive, got `0`");
    let labels: Vec<String> = a.labels.iter().map(|l| l.trim().to_string()).collect();
    if let Some(empty) = labels.iter().position(String::is_empty) {
        bail!("--labels: label {} is empty", empty + 1);
    }
    let base = crate::model::generate_config(&a.sampling)?;
    let mut inputs = distill::read_inputs(&a.inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(n) = a.limit {
        inputs.truncate(n);
    }
    let system = match &a.system_prompt_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read --system-prompt-file {}", p.display()))?
                .trim_end()
                .to_string(),
        ),
        None => None,
    };
    let rules = match &a.rules {
        Some(p) => Some(whet_eval::rules::Rules::read(p)?),
        None => None,
    };
    let schema = a.json_schema.as_deref().map(whet_eval::schema::JsonSchema::read).transpose()?;
    let student = a.train.as_deref().map(|run| student_config(&a, run)).transpose()?;
    let shots = match &a.shots_from {
        Some(p) if a.shots > 0 => draw_shots(p, a.shots, &labels, a.sampling.seed)?,
        _ => vec![],
    };
    let mut given: Vec<(&str, &Path)> = vec![("--inputs", a.inputs.as_path())];
    given.extend(a.system_prompt_file.as_deref().map(|p| ("--system-prompt-file", p)));
    given.extend(a.shots_from.as_deref().map(|p| ("--shots-from", p)));
    given.extend(a.rules.as_deref().map(|p| ("--rules", p)));
    given.extend(a.json_schema.as_deref().map(|p| ("--json-schema", p)));
    let teacher_path = Path::new(&a.teacher);
    if teacher_path.exists() {
        given.push(("--teacher", teacher_path));
    }
    let out = Output::plan(&a.out, Shape::Dir, "distill", a.overwrite, &given)?;

    // What shapes the teacher's answers, and so keys the cache.
    let settings = json!({
        "teacher": a.teacher,
        "teacher_quantize": a.teacher_quantize,
        "system_prompt_sha256": system.as_deref().map(|s| whet_data::cache::sha256_hex(s.as_bytes())),
        "shots": shots.iter().map(|(u, r)| json!([u, r])).collect::<Vec<_>>(),
        "samples": a.samples,
        "max_tokens": base.max_tokens,
        "temperature": base.sampling.temperature,
        "top_k": base.sampling.top_k,
        "top_p": base.sampling.top_p,
        "repetition_penalty": base.sampling.repetition_penalty,
        "stop": base.stop,
        "seed": base.sampling.seed,
    });
    let key = whet_data::cache::sha256_hex(settings.to_string().as_bytes())[..16].to_string();
    let cache_path = cache_file(&a.out, &key);
    let mut cache = read_cache(&cache_path)?;
    // A finished output with the same settings answers from its own answers.jsonl.
    let previous = a.out.join("distill.json");
    if std::fs::read_to_string(&previous)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v["teacher_settings_sha256"] == key.as_str())
    {
        for (id, ans) in read_cache(&a.out.join("answers.jsonl"))? {
            cache.entry(id).or_insert(ans);
        }
    }
    let mut seen = HashSet::new();
    let missing: Vec<&Input> =
        inputs.iter().filter(|i| seen.insert(i.id.clone()) && !cache.contains_key(&i.id)).collect();
    let from_cache = seen.len() - missing.len();
    if !missing.is_empty() {
        let prompts: Vec<Vec<Message>> =
            missing.iter().map(|i| teacher_messages(system.as_deref(), &shots, i)).collect();
        let asked = match &endpoint {
            Some(e) => ask_endpoint(&a, e, &base, &prompts, &missing, &cache_path)?,
            None => {
                let m = load_teacher(&a, &whet_model::DeviceSpec::Auto.open()?)?;
                ask_teacher(&a, &m, &base, &prompts, &missing, &cache_path)?
            }
        };
        cache.extend(asked.into_iter().map(|x| (x.id.clone(), x)));
    }

    // Vote and filter, in input order.
    let mut dropped: BTreeMap<Dropped, usize> = BTreeMap::new();
    let mut kept: Vec<(&Input, distill::Vote)> = vec![];
    let mut ids = HashSet::new();
    for input in &inputs {
        if !ids.insert(&input.id) {
            *dropped.entry(Dropped::DuplicateInput).or_default() += 1;
            continue;
        }
        let ans = &cache[&input.id];
        match judge(ans, &labels, rules.as_ref(), schema.as_ref(), a.min_agreement) {
            Ok(vote) => kept.push((input, vote)),
            Err(why) => *dropped.entry(why).or_default() += 1,
        }
    }
    let counts =
        || dropped.iter().map(|(k, n)| format!("{} {n}", k.name())).collect::<Vec<_>>().join(", ");
    if kept.is_empty() {
        bail!(
            "{}: all {} inputs were dropped ({}); nothing was written\nhint: the teacher's answers are kept in {}; check them, the prompt and --labels",
            a.inputs.display(),
            inputs.len(),
            counts(),
            cache_path.display()
        );
    }

    // Write the dataset: the student's prompt is the bare input.
    let ids: Vec<String> = kept.iter().map(|(i, _)| i.id.clone()).collect();
    let splits = distill::assign_splits(&ids, shares, a.sampling.seed);
    let dir = out.staging()?;
    let mut files: [Vec<String>; 3] = Default::default();
    for ((input, vote), &split) in kept.iter().zip(&splits) {
        let mut messages = input.messages.clone();
        messages.push(Message::new("assistant", &vote.answer));
        files[split].push(json!({"id": input.id, "messages": messages}).to_string());
    }
    let mut sizes = [0; 3];
    for (split, lines) in files.iter().enumerate() {
        sizes[split] = lines.len();
        if !lines.is_empty() {
            let path = distill::split_file(dir, split);
            std::fs::write(&path, lines.join("\n") + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    // The raw answers of every distinct input, in a stable order.
    let mut answers: Vec<String> = seen
        .iter()
        .filter_map(|id| cache.get(id))
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    answers.sort();
    std::fs::write(dir.join("answers.jsonl"), answers.join("\n") + "\n")?;
    let agreement: BTreeMap<&str, f64> =
        kept.iter().map(|(i, v)| (i.id.as_str(), v.agreement)).collect();
    let summary = json!({
        "teacher": a.teacher,
        "teacher_settings": settings,
        "teacher_settings_sha256": key,
        "inputs": inputs.len(),
        "kept": kept.len(),
        "dropped": dropped.iter().map(|(k, n)| (k.name().to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "labels": labels,
        "rules": a.rules.as_ref().map(|p| p.display().to_string()),
        "json_schema": a.json_schema.as_ref().map(|p| p.display().to_string()),
        "min_agreement": a.min_agreement,
        "split": {"train": sizes[0], "valid": sizes[1], "test": sizes[2]},
        "teacher_calls": missing.len() * a.samples,
        "answers_from_cache": from_cache,
        "agreement": agreement,
    });
    std::fs::write(dir.join("distill.json"), serde_json::to_string_pretty(&summary)? + "\n")?;
    let written = out.commit()?;
    let _ = std::fs::remove_file(&cache_path);
    let mut o = std::io::stdout().lock();
    writeln!(
        o,
        "inputs:   {} ({} answered from the cache, {} asked)",
        inputs.len(),
        from_cache,
        missing.len()
    )?;
    writeln!(
        o,
        "kept:     {} (train {}, valid {}, test {})",
        kept.len(),
        sizes[0],
        sizes[1],
        sizes[2]
    )?;
    writeln!(o, "dropped:  {}", if dropped.is_empty() { "none".into() } else { counts() })?;
    if a.samples > 1 {
        let mean = kept.iter().map(|(_, v)| v.agreement).sum::<f64>() / kept.len() as f64;
        writeln!(o, "agreement: {mean:.3} mean over kept inputs ({} samples each)", a.samples)?;
    }
    writeln!(o, "wrote {}", written.display())?;
    drop(o);
    if let (Some(run), Some(c)) = (&a.train, student) {
        train_and_compare(&a, run, c, system.as_deref(), endpoint.is_some(), &base)?;
    }
    Ok(())
}

/// `--train RUN`'s settings, checked before the teacher is asked anything: the student's
/// training configuration (its data the distilled set), a run directory that is new (or, with
/// --overwrite, an earlier run's), and a --gold file whose every line has an answer.
fn student_config(a: &DistillArgs, run: &Path) -> Result<whet_train::TrainConfig> {
    let mut c = match &a.train_config {
        Some(p) => whet_train::TrainConfig::from_file(p)?,
        None => whet_train::TrainConfig::default(),
    };
    if let Some(s) = &a.student {
        c.model = s.clone();
    }
    c.data = a.out.display().to_string();
    c.validate()?;
    let shares = distill::parse_split(&a.split).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        shares[2] > 0.0,
        "--train compares on the held-out test split, and --split {} holds none out\nhint: --split 0.8,0.1,0.1",
        a.split
    );
    let occupied = run.exists() && std::fs::read_dir(run).map_or(true, |mut d| d.next().is_some());
    if occupied && !(a.overwrite && run.join("whet.toml").is_file()) {
        bail!(
            "--train {}: already holds files{}\nhint: name a new run directory{}",
            run.display(),
            if run.join("whet.toml").is_file() { " (an earlier run)" } else { "" },
            if run.join("whet.toml").is_file() {
                ", or pass --overwrite to replace it"
            } else {
                ""
            }
        );
    }
    for (flag, input) in [("--out", a.out.as_path()), ("--inputs", a.inputs.as_path())] {
        if run.starts_with(input) || input.starts_with(run) {
            bail!(
                "--train {}: overlaps {flag} {}\nhint: name a run directory of its own",
                run.display(),
                input.display()
            );
        }
    }
    if let Some(gold) = &a.gold {
        let examples = whet_eval::read_examples(gold)?;
        anyhow::ensure!(!examples.is_empty(), "--gold {}: no examples", gold.display());
    }
    Ok(c)
}

/// A local teacher, in f32 (`--teacher-quantize` for its linear layers).
fn load_teacher(a: &DistillArgs, device: &candle_core::Device) -> Result<whet_model::LoadedModel> {
    let quantize = a.teacher_quantize.map(whet_model::Quantization::ggml);
    crate::model::load_spec_quantized(
        &a.teacher,
        candle_core::DType::F32,
        device,
        a.sampling.seed,
        quantize,
    )
}

/// `--train RUN`: the student trained on the distilled set, then `whet compare` of it against
/// itself prompted as the teacher was and against the teacher (when local), on the held-out
/// split and on `--gold`.
fn train_and_compare(
    a: &DistillArgs,
    run: &Path,
    c: whet_train::TrainConfig,
    system: Option<&str>,
    teacher_is_endpoint: bool,
    base: &GenerateConfig,
) -> Result<()> {
    let data = a.out.as_path();
    eprintln!("train: the student {} on {} into {}", c.model, data.display(), run.display());
    let adapter = crate::train::train_quietly(c.clone(), run)?;
    let device = c.device.open()?;
    let mut student = crate::model::load_spec(&c.model, c.dtype.dtype(), &device, c.seed)?;
    whet_model::adapter::load_named_adapter(&mut student.model, "fine-tuned", 1.0, &adapter)?;
    student.model.set_adapter_weights(&[])?;
    let template = chat_template(&student.tokenizer)?;
    let student = whet_eval::run::Model {
        model: student.model,
        tokenizer: student.tokenizer,
        template,
        source: student.source,
    };
    let teacher = if teacher_is_endpoint {
        eprintln!(
            "note: the teacher is an endpoint, which whet compare cannot run as an arm: the comparison is the student's alone"
        );
        None
    } else {
        let t = load_teacher(a, &device)?;
        let template = chat_template(&t.tokenizer)?;
        Some(whet_eval::run::Model {
            model: t.model,
            tokenizer: t.tokenizer,
            template,
            source: t.source,
        })
    };
    let settings = whet_eval::run::RunSettings {
        max_tokens: base.max_tokens,
        seeds: 0,
        sampling: whet_infer::SamplingConfig::default(),
        latency_samples: 8,
        max_batch: a.max_batch,
        bootstrap_seed: a.sampling.seed,
        resamples: 1000,
        reference_loss: false,
    };
    // Each comparison's data directory, in the run: the distilled training and validation
    // splits beside the test split (the held-out one, or --gold), and --rules as rules.toml.
    let mut places = vec![("compare", data.join("test.jsonl"))];
    if let Some(gold) = &a.gold {
        places.push(("compare-gold", gold.clone()));
    }
    let data_dir = |name: &str, test: &Path| -> Result<PathBuf> {
        let dir = run.join(format!("{name}-data"));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot write {}", dir.display()))?;
        for split in ["train.jsonl", "valid.jsonl"] {
            if data.join(split).is_file() {
                std::fs::copy(data.join(split), dir.join(split))?;
            }
        }
        std::fs::copy(test, dir.join("test.jsonl"))
            .with_context(|| format!("cannot read {}", test.display()))?;
        if let Some(rules) = &a.rules {
            std::fs::copy(rules, dir.join("rules.toml"))?;
        }
        Ok(dir)
    };
    for (name, test) in places {
        anyhow::ensure!(
            test.is_file(),
            "{name}: {} is missing; hint: a --split with a test share holds examples out for it",
            test.display()
        );
        let dir = data_dir(name, &test)?;
        let cfg = whet_eval::compare::CompareConfig {
            data: dir.clone(),
            system_prompt: system.map(str::to_string),
            shots: if a.shots > 0 { vec![0, a.shots] } else { vec![0] },
            shot_draws: 1,
            seed: a.sampling.seed,
            metrics: vec![],
            price_per_1k_tokens: None,
            adapters: vec![("fine-tuned".into(), adapter.clone())],
            limit: None,
            run: settings.clone(),
        };
        let mut progress = |what: &str| eprintln!("{name}: {what}");
        let report = whet_eval::compare::compare(&student, teacher.as_ref(), &cfg, &mut progress)?;
        let out = run.join(name);
        std::fs::create_dir_all(&out).with_context(|| format!("cannot write {}", out.display()))?;
        whet_eval::report::write(&report, &out)?;
        let mut o = std::io::stdout().lock();
        writeln!(o, "\n{name} ({}):", dir.join("test.jsonl").display())?;
        write!(o, "{}", whet_eval::report::table(&report))?;
        writeln!(o, "{}", report.verdict)?;
        writeln!(o, "wrote {}", out.display())?;
    }
    Ok(())
}

/// The vote on one input's answers, or why it is dropped.
fn judge(
    ans: &Answers,
    labels: &[String],
    rules: Option<&whet_eval::rules::Rules>,
    schema: Option<&whet_eval::schema::JsonSchema>,
    min_agreement: f64,
) -> Result<distill::Vote, Dropped> {
    // An answer cut at --max-tokens, or an empty one, counts against the majority and cannot
    // win it.
    let mut usable: Vec<String> = ans
        .answers
        .iter()
        .zip(&ans.finish)
        .map(|(t, f)| if f == "length" { String::new() } else { t.trim().to_string() })
        .collect();
    if usable.iter().all(String::is_empty) {
        return Err(if ans.finish.iter().any(|f| f == "length") {
            Dropped::Truncated
        } else {
            Dropped::Empty
        });
    }
    // So does one that breaks a rule.
    if let Some(rules) = rules {
        for u in usable.iter_mut() {
            if !rules.rules.iter().all(|r| r.check(u)) {
                u.clear();
            }
        }
        if usable.iter().all(String::is_empty) {
            return Err(Dropped::BreaksRules);
        }
    }
    // And one that is not JSON the schema accepts; the others are their JSON alone, so that
    // answers that differ only in spacing or a code fence vote together.
    if let Some(schema) = schema {
        for u in usable.iter_mut().filter(|u| !u.is_empty()) {
            *u = schema.check(u).map(|v| v.to_string()).unwrap_or_default();
        }
        if usable.iter().all(String::is_empty) {
            return Err(Dropped::BreaksSchema);
        }
    }
    let vote = if labels.is_empty() {
        distill::majority(&usable, |t| (!t.is_empty()).then(|| t.to_string()))
    } else {
        distill::majority(&usable, |t| distill::as_label(t, labels))
    };
    let vote = vote.ok_or(Dropped::NotALabel)?;
    if vote.agreement < min_agreement {
        return Err(Dropped::LowAgreement);
    }
    Ok(vote)
}

/// The answer cache beside `out`: `.NAME.whet-distill-KEY.jsonl`.
fn cache_file(out: &Path, key: &str) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!(".{name}.whet-distill-{key}.jsonl"))
}

/// The cached answers by input id. A last line cut short by a kill is left out (and its
/// input asked again).
fn read_cache(path: &Path) -> Result<HashMap<String, Answers>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(HashMap::new()) };
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Answers>(line) {
            Ok(x) if x.answers.len() == x.finish.len() => drop(out.insert(x.id.clone(), x)),
            _ if i + 1 == text.lines().count() && !text.ends_with('\n') => {}
            _ => bail!("{}:{}: not a line whet distill wrote", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// Ask the teacher for `inputs`, batched through the engine, appending each input's answers
/// to the cache as they come.
fn ask_teacher(
    a: &DistillArgs,
    m: &whet_model::LoadedModel,
    base: &GenerateConfig,
    prompts: &[Vec<Message>],
    inputs: &[&Input],
    cache_path: &Path,
) -> Result<Vec<Answers>> {
    let template = chat_template(&m.tokenizer)?;
    let mut cache = open_cache(cache_path)?;
    let bar = progress(inputs.len());
    let engine = EngineConfig { max_batch: a.max_batch, ..EngineConfig::default() };
    let mut out = vec![];
    let chunk_len = a.max_batch.max(1) * 2;
    for (chunk, prompts) in inputs.chunks(chunk_len).zip(prompts.chunks(chunk_len)) {
        let mut jobs = vec![];
        for (input, messages) in chunk.iter().zip(prompts) {
            let text = template.render(messages, true).with_context(|| input.at.clone())?;
            let prompt = m.tokenizer.encode(&text).with_context(|| input.at.clone())?;
            let configs = (0..a.samples)
                .map(|j| {
                    let mut c = base.clone();
                    c.sampling.seed = base.sampling.seed.wrapping_add(j as u64);
                    c
                })
                .collect();
            jobs.push((prompt, vec![], configs));
        }
        let results = generate_forks(&m.model, &m.tokenizer, jobs, engine);
        let mut lines = String::new();
        for (input, samples) in chunk.iter().zip(results) {
            let mut ans = Answers { id: input.id.clone(), answers: vec![], finish: vec![] };
            for g in samples {
                let g = g.with_context(|| format!("{}: the teacher failed", input.at))?;
                ans.answers.push(g.text);
                ans.finish.push(g.stop_reason.finish_reason().to_string());
            }
            lines.push_str(&serde_json::to_string(&ans)?);
            lines.push('\n');
            out.push(ans);
        }
        // One write per chunk of whole lines: a kill loses at most this chunk.
        cache.write_all(lines.as_bytes())?;
        cache.flush()?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// What the teacher sees: its system prompt, the shots, then the input.
fn teacher_messages(
    system: Option<&str>,
    shots: &[(String, String)],
    input: &Input,
) -> Vec<Message> {
    let mut messages: Vec<Message> =
        system.map(|s| Message::new("system", s)).into_iter().collect();
    for (user, answer) in shots {
        messages.push(Message::new("user", user));
        messages.push(Message::new("assistant", answer));
    }
    messages.extend(input.messages.iter().cloned());
    messages
}

/// The cache, open for appending whole lines.
fn open_cache(path: &Path) -> Result<std::fs::File> {
    let mut cache = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // A line cut short by a kill would run into the next one.
    if std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
        && !std::fs::read(path).unwrap_or_default().ends_with(b"\n")
    {
        cache.write_all(b"\n")?;
    }
    Ok(cache)
}

fn progress(n: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} inputs [{elapsed_precise}<{eta_precise}] {per_sec} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// An OpenAI-compatible teacher.
struct Endpoint {
    /// `BASE/chat/completions`.
    url: String,
    model: String,
    key: Option<String>,
}

/// The endpoint `--teacher` names, if it is a URL, with its flags checked.
fn endpoint(a: &DistillArgs) -> Result<Option<Endpoint>> {
    let is_url = a.teacher.starts_with("http://") || a.teacher.starts_with("https://");
    if !is_url {
        for (given, flag) in [
            (a.teacher_model.is_some(), "--teacher-model"),
            (a.api_key_env.is_some(), "--api-key-env"),
        ] {
            anyhow::ensure!(
                !given,
                "{flag} is for an endpoint teacher, and --teacher `{}` is a model",
                a.teacher
            );
        }
        return Ok(None);
    }
    anyhow::ensure!(
        a.teacher_quantize.is_none(),
        "--teacher-quantize is for a local teacher; the server at {} decodes its own way",
        a.teacher
    );
    let Some(model) = a.teacher_model.clone() else {
        bail!(
            "--teacher {} is an endpoint: say which model to ask for\nhint: pass --teacher-model NAME (GET {}/models lists them)",
            a.teacher,
            a.teacher.trim_end_matches('/')
        );
    };
    let key = match &a.api_key_env {
        Some(var) => Some(std::env::var(var).map_err(|_| {
            anyhow::anyhow!("--api-key-env {var}: the environment variable {var} is not set")
        })?),
        None => None,
    };
    anyhow::ensure!(a.concurrency > 0, "--concurrency must be at least 1, got `0`");
    anyhow::ensure!(
        a.timeout.is_finite() && a.timeout > 0.0,
        "--timeout must be a positive number of seconds, got `{}`",
        a.timeout
    );
    let url = format!("{}/chat/completions", a.teacher.trim_end_matches('/'));
    Ok(Some(Endpoint { url, model, key }))
}

/// Ask an OpenAI-compatible endpoint, `--concurrency` requests at a time, retrying 429, 5xx
/// and lost connections with backoff; an input's answers go to the cache once all its samples
/// are in.
fn ask_endpoint(
    a: &DistillArgs,
    e: &Endpoint,
    base: &GenerateConfig,
    prompts: &[Vec<Message>],
    inputs: &[&Input],
    cache_path: &Path,
) -> Result<Vec<Answers>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut cache = open_cache(cache_path)?;
    let bar = progress(inputs.len());
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs_f64(a.timeout))
        .build()
        .context("cannot make an HTTP client")?;
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(a.concurrency));
    let mut slots: Vec<Vec<Option<(String, String)>>> =
        inputs.iter().map(|_| vec![None; a.samples]).collect();
    let mut out = vec![];
    bar.set_message(format!("({} requests in flight at most)", a.concurrency));
    runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, messages) in prompts.iter().enumerate() {
            for j in 0..a.samples {
                let mut body = json!({
                    "model": e.model,
                    "messages": messages,
                    "max_tokens": base.max_tokens,
                    "temperature": base.sampling.temperature,
                    "top_p": base.sampling.top_p,
                    "seed": base.sampling.seed.wrapping_add(j as u64),
                });
                if !base.stop.is_empty() {
                    body["stop"] = json!(base.stop);
                }
                let (client, limit) = (client.clone(), limit.clone());
                let (url, key, retries) = (e.url.clone(), e.key.clone(), a.retries);
                tasks.spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    (i, j, post(&client, &url, key.as_deref(), &body, retries).await)
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            let (i, j, r) = done.context("a request task failed")?;
            let answer = r.map_err(|msg| anyhow::anyhow!("{}: {msg}", inputs[i].at))?;
            slots[i][j] = Some(answer);
            if slots[i].iter().all(Option::is_some) {
                let (answers, finish) = slots[i].iter().flatten().cloned().unzip();
                let ans = Answers { id: inputs[i].id.clone(), answers, finish };
                cache.write_all((serde_json::to_string(&ans)? + "\n").as_bytes())?;
                cache.flush()?;
                out.push(ans);
                bar.inc(1);
            }
        }
        anyhow::Ok(())
    })?;
    bar.finish_and_clear();
    Ok(out)
}

/// Why one request failed: whether it is worth retrying, what happened, and the server's
/// `Retry-After` in seconds.
type Failure = (bool, String, Option<f64>);

/// One chat completion: its text and finish reason, or why it failed for good.
async fn post(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &Value,
    retries: u32,
) -> std::result::Result<(String, String), String> {
    let mut attempt = 0;
    loop {
        match post_once(client, url, key, body).await {
            Ok(answer) => return Ok(answer),
            Err((true, msg, after)) if attempt < retries => {
                let backoff = after.unwrap_or(0.5 * 2f64.powi(attempt as i32)).clamp(0.0, 30.0);
                tracing::info!("{msg}; retrying in {backoff:.1} s");
                tokio::time::sleep(std::time::Duration::from_secs_f64(backoff)).await;
                attempt += 1;
            }
            Err((retryable, msg, _)) => {
                let tries =
                    if retryable { format!(" ({} tries)", attempt + 1) } else { String::new() };
                return Err(format!("{msg}{tries}"));
            }
        }
    }
}

async fn post_once(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &Value,
) -> std::result::Result<(String, String), Failure> {
    let mut req = client.post(url).json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.map_err(|e| (true, format!("cannot reach {url}: {e}"), None))?;
    let status = resp.status();
    let after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok());
    let text = resp
        .text()
        .await
        .map_err(|e| (true, format!("{url} dropped the connection: {e}"), None))?;
    let parsed = serde_json::from_str::<Value>(&text);
    if !status.is_success() {
        let why = parsed
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| clip(&text));
        let again = status.as_u16() == 429 || status.is_server_error();
        return Err((again, format!("{url} answered {status}: {why}"), after));
    }
    let v = parsed.map_err(|_| {
        (
            false,
            format!("{url} answered {status} with something that is not JSON: {}", clip(&text)),
            None,
        )
    })?;
    let choice = &v["choices"][0];
    let content = match &choice["message"]["content"] {
        Value::String(t) => Some(t.clone()),
        Value::Null if choice.is_object() => Some(String::new()),
        _ => None,
    };
    match (content, choice["finish_reason"].as_str()) {
        (Some(t), Some(f)) => Ok((t, f.to_string())),
        _ => Err((
            false,
            format!(
                "{url} answered without `choices[0].message.content` and `finish_reason`: {}",
                clip(&text)
            ),
            None,
        )),
    }
}

fn clip(text: &str) -> String {
    let t: String = text.chars().take(120).collect();
    if t.len() < text.len() {
        format!("{t}…")
    } else {
        t
    }
}

/// `k` worked examples (first user turn, last answer) from a chat dataset with answers,
/// drawn with `seed`; with labels, in turn from each label's examples.
fn draw_shots(
    path: &Path,
    k: usize,
    labels: &[String],
    seed: u64,
) -> Result<Vec<(String, String)>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let (_, records) =
        whet_data::format::read_jsonl(path, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut pairs: Vec<(String, String)> = records
        .into_iter()
        .filter_map(|r| match r.example {
            whet_data::Example::Chat(turns) => {
                let user = turns.iter().find(|t| t.role == whet_data::Role::User)?;
                let answer = turns.iter().rev().find(|t| t.role == whet_data::Role::Assistant)?;
                Some((user.content.clone(), answer.content.clone()))
            }
            whet_data::Example::Completion { prompt, completion } => Some((prompt, completion)),
            _ => None,
        })
        .collect();
    anyhow::ensure!(
        pairs.len() >= k,
        "--shots {k}: {} has only {} examples with an answer",
        path.display(),
        pairs.len()
    );
    pairs.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    if labels.is_empty() {
        pairs.truncate(k);
        return Ok(pairs);
    }
    let mut by_label: Vec<Vec<(String, String)>> = labels.iter().map(|_| vec![]).collect();
    for p in pairs {
        if let Some(l) = distill::as_label(&p.1, labels) {
            let i = labels.iter().position(|x| *x == l).unwrap_or(0);
            by_label[i].push(p);
        }
    }
    let mut shots = vec![];
    let mut round = 0;
    while shots.len() < k {
        let before = shots.len();
        for group in &by_label {
            if shots.len() < k {
                if let Some(p) = group.get(round) {
                    shots.push(p.clone());
                }
            }
        }
        anyhow::ensure!(
            shots.len() > before,
            "--shots {k}: {} has only {} examples whose answer is one of --labels",
            path.display(),
            shots.len()
        );
        round += 1;
    }
    Ok(shots)
}

/// `whet bench distill`: the same labelling as `whet distill` (no cache kept, nothing
/// written), first one input at a time, then batched or concurrent; inputs/s of each.
pub fn bench(b: crate::args::BenchDistillArgs) -> Result<()> {
    use clap::Parser;
    anyhow::ensure!(b.limit > 0 && b.max_tokens > 0, "--limit and --max-tokens must be positive");
    let load_before = whet_infer::bench::load_average();
    let tmp = tempfile::tempdir()?;
    let inputs = b.inputs.display().to_string();
    let out = tmp.path().join("out").display().to_string();
    // The settings as `whet distill` parses them, so that both run the same labelling.
    let args_for = |parallel: usize| -> Result<DistillArgs> {
        let mut v =
            vec!["whet".to_string(), "distill".into(), "--teacher".into(), b.teacher.clone()];
        v.extend(["--inputs".into(), inputs.clone(), "--out".into(), out.clone()]);
        v.extend([
            "--max-tokens".into(),
            b.max_tokens.to_string(),
            "--limit".into(),
            b.limit.to_string(),
        ]);
        v.extend([
            "--max-batch".into(),
            parallel.to_string(),
            "--concurrency".into(),
            parallel.to_string(),
        ]);
        if let Some(m) = &b.teacher_model {
            v.extend(["--teacher-model".into(), m.clone()]);
        }
        match crate::args::Cli::try_parse_from(v)?.command {
            crate::args::Command::Distill(a) => Ok(a),
            _ => bail!("internal error: not a distill command"),
        }
    };
    let mut out_lines = vec![];
    let mut rates = vec![];
    let remote = b.teacher.starts_with("http://") || b.teacher.starts_with("https://");
    let many = if remote { b.concurrency } else { b.max_batch };
    // A local teacher loads once, before the clock starts: both runs time labelling alone.
    let local = if remote {
        None
    } else {
        Some(load_teacher(&args_for(1)?, &whet_model::DeviceSpec::Auto.open()?)?)
    };
    for parallel in [1, many] {
        let a = args_for(parallel)?;
        let endpoint = endpoint(&a)?;
        let base = crate::model::generate_config(&a.sampling)?;
        let mut all = distill::read_inputs(&a.inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
        all.truncate(b.limit);
        anyhow::ensure!(!all.is_empty(), "{}: no inputs", b.inputs.display());
        let refs: Vec<&Input> = all.iter().collect();
        let prompts: Vec<Vec<Message>> =
            refs.iter().map(|i| teacher_messages(None, &[], i)).collect();
        let cache = tmp.path().join(format!("cache-{parallel}.jsonl"));
        let start = std::time::Instant::now();
        match (&endpoint, &local) {
            (Some(e), _) => ask_endpoint(&a, e, &base, &prompts, &refs, &cache)?,
            (None, Some(m)) => ask_teacher(&a, m, &base, &prompts, &refs, &cache)?,
            (None, None) => bail!("internal error: a local teacher was not loaded"),
        };
        let rate = refs.len() as f64 / start.elapsed().as_secs_f64();
        rates.push(rate);
        let how = match (remote, parallel) {
            (_, 1) => "one at a time".to_string(),
            (true, n) => format!("{n} requests in flight"),
            (false, n) => format!("batched, up to {n} at once"),
        };
        out_lines.push(format!(
            "{how:<28} {rate:.2} inputs/s ({} inputs, {} tokens each at most)",
            refs.len(),
            b.max_tokens
        ));
    }
    let mut o = std::io::stdout().lock();
    writeln!(o, "teacher:    {}", b.teacher)?;
    for l in out_lines {
        writeln!(o, "labelling:  {l}")?;
    }
    writeln!(o, "speed-up:   {:.2}x", rates[1] / rates[0])?;
    writeln!(o, "{}", whet_infer::bench::load_line(load_before))?;
    Ok(())
}
