//! `whet compare`: the same held-out examples through prompted arms (base model, system prompt,
//! k few-shot examples drawn by seed from the training data, the best k chosen on the
//! validation set), the fine-tuned arm (adapter, bare prompt), fine-tuned + prompt, and
//! optionally a larger prompted baseline; then a verdict that follows from the numbers.

use crate::metrics::Estimate;
use crate::run::{run_arm, ArmResult, Model, Prompting, RunSettings};
use crate::{Error, Example, Task};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// The data directory (`train.jsonl`, `valid.jsonl`, `test.jsonl`).
    pub data: PathBuf,
    /// The engineered system prompt of the prompted arms.
    pub system_prompt: Option<String>,
    /// Numbers of few-shot examples to try.
    pub shots: Vec<usize>,
    /// Draws of the examples to try for each number above 0, chosen among on validation.
    pub shot_draws: usize,
    /// Seed of the shot draw and the bootstrap.
    pub seed: u64,
    /// `--metric` names (empty: the task's).
    pub metrics: Vec<String>,
    /// Price per 1,000 tokens (prompt and answer), for cost per 1M queries.
    pub price_per_1k_tokens: Option<f64>,
    /// The fine-tuned adapters, each loaded into the model as a named adapter under its name
    /// here, and their directories (a run directory holds the training cost); one fine-tuned
    /// arm each, in this order, the first the one the verdict weighs against prompting.
    pub adapters: Vec<(String, PathBuf)>,
    /// Score only the first N test examples (`--limit`).
    pub limit: Option<usize>,
    /// Run settings of every arm.
    pub run: RunSettings,
}

/// One arm of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Arm {
    /// Shown in tables.
    pub name: String,
    /// `prompted`, `finetuned`, `finetuned+prompt` or `baseline`.
    pub kind: &'static str,
    /// Few-shot examples in its prompt.
    pub shots: usize,
    /// The model it ran.
    pub model: String,
    /// Whether the best prompted arm on the validation set.
    pub chosen: bool,
    /// The named adapter it ran (fine-tuned arms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// What training its adapter cost, where its run directory says (fine-tuned arms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingCost>,
    /// With several draws of the shots: the validation scores of every draw (prompted arms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draws: Option<Draws>,
    /// The validation score that chose k (prompted arms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_score: Option<f64>,
    /// Cost per 1M queries at `--price-per-1k-tokens`.
    pub cost_per_1m_queries: Option<f64>,
    /// Machine-hours per 1M queries, from the measured batched throughput.
    pub machine_hours_per_1m_queries: f64,
    /// Everything measured.
    #[serde(flatten)]
    pub result: ArmResult,
}

/// The validation scores of several draws of one arm's few-shot examples.
#[derive(Debug, Clone, Serialize)]
pub struct Draws {
    /// Each draw's score, by seed offset.
    pub scores: Vec<f64>,
    /// Their mean.
    pub mean: f64,
    /// Their lowest and highest.
    pub range: [f64; 2],
    /// The seed of the draw chosen (the best).
    pub chosen_seed: u64,
}

/// What training the adapter cost, from its run directory's `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingCost {
    /// Optimizer steps.
    pub steps: usize,
    /// Tokens run through the model.
    pub tokens: usize,
    /// Seconds of training steps.
    pub seconds: f64,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Every arm, prompted ones first.
    pub arms: Vec<Arm>,
    /// The conclusion, in a few sentences.
    pub verdict: String,
    /// Task, metrics, data, models, settings.
    pub settings: serde_json::Value,
    /// The adapter's training cost, when its run directory says.
    pub training: Option<TrainingCost>,
    /// Warnings raised on the way (labels unseen in training, ...).
    pub warnings: Vec<String>,
    /// The metric of adapters trained on growing subsets of the training data.
    pub learning_curve: Option<LearningCurve>,
}

/// `--learning-curve`: the fine-tuned metric against the number of training examples, with the
/// best prompted arm as the line to cross.
#[derive(Debug, Clone, Serialize)]
pub struct LearningCurve {
    /// (training examples, metric on the test set).
    pub points: Vec<(usize, Estimate)>,
    /// The best prompted arm's metric.
    pub prompted: Estimate,
    /// Its name.
    pub prompted_name: String,
    /// The fewest examples whose adapter beats the prompted mean, if any.
    pub crosses_at: Option<usize>,
}

impl LearningCurve {
    /// Build from points and the report's chosen prompted arm.
    pub fn new(points: Vec<(usize, Estimate)>, report: &Report) -> Option<Self> {
        let m = report.primary().to_string();
        let arm = report.arms.iter().find(|a| a.chosen)?;
        let prompted = arm.result.metrics[&m];
        let crosses_at = points.iter().find(|(_, e)| e.mean > prompted.mean).map(|(n, _)| *n);
        Some(Self { points, prompted, prompted_name: arm.name.clone(), crosses_at })
    }
}

impl Report {
    /// The metric arms are ranked by.
    pub fn primary(&self) -> &str {
        self.settings["metrics"][0].as_str().unwrap_or("")
    }
}

/// Few-shot examples: `k` single-question training examples drawn by `seed`. For a label task
/// the draw is stratified, as few-shot classification practice does: one example of each
/// label in turn (labels in the order the shuffle meets them), so that three shots cannot all
/// say `positive` and teach the model to answer nothing else.
pub fn draw_shots(train: &[Example], k: usize, seed: u64) -> Result<Vec<(String, String)>, Error> {
    let pool: Vec<(String, String)> = train
        .iter()
        .filter(|e| e.messages.len() == 1 && e.messages[0].role == "user")
        .map(|e| (e.messages[0].content.clone(), e.reference.clone()))
        .collect();
    if k > pool.len() {
        return Err(Error::Input(format!(
            "--shots {k} is more than the {} single-question examples of the training data",
            pool.len()
        )));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..pool.len()).collect();
    idx.shuffle(&mut rng);
    let references: Vec<String> = pool.iter().map(|(_, r)| r.clone()).collect();
    if crate::Task::detect(&references) != crate::Task::Labels {
        return Ok(idx[..k].iter().map(|&i| pool[i].clone()).collect());
    }
    let mut groups: Vec<(String, Vec<usize>)> = vec![];
    for &i in &idx {
        let label = crate::metrics::normalize(&pool[i].1);
        match groups.iter_mut().find(|(l, _)| *l == label) {
            Some((_, g)) => g.push(i),
            None => groups.push((label, vec![i])),
        }
    }
    // Round by round, one of each label that has one left; k is at most the pool's size.
    let mut shots = vec![];
    let mut round = 0;
    while shots.len() < k {
        for (_, g) in &groups {
            if let Some(&i) = g.get(round).filter(|_| shots.len() < k) {
                shots.push(pool[i].clone());
            }
        }
        round += 1;
    }
    Ok(shots)
}

/// Read `RUN/metrics.jsonl` beside an adapter in `RUN/adapter` (or `RUN/best`).
pub fn training_cost(adapter: &Path) -> Option<TrainingCost> {
    let run = [adapter.join("metrics.jsonl"), adapter.parent()?.join("metrics.jsonl")]
        .into_iter()
        .find(|p| p.is_file())?;
    let text = std::fs::read_to_string(run).ok()?;
    let (mut steps, mut tokens, mut seconds) = (0, 0, 0.0);
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v.get("loss").is_some() {
            steps += 1;
            tokens += v["tokens"].as_u64().unwrap_or(0) as usize;
            seconds += v["secs"].as_f64().unwrap_or(0.0);
        }
    }
    (steps > 0).then_some(TrainingCost { steps, tokens, seconds })
}

/// The data of a comparison, its task and metrics.
pub struct Setup {
    /// Training examples (shots are drawn from them).
    pub train: Vec<Example>,
    /// Validation examples (the best k is chosen on them).
    pub valid: Vec<Example>,
    /// Test examples.
    pub test: Vec<Example>,
    /// The task the references show.
    pub task: Task,
    /// `rules.toml` beside the data.
    pub rules: Option<crate::rules::Rules>,
    /// The metrics, the first the one arms are ranked by.
    pub metrics: Vec<String>,
    /// Warnings (labels unseen in training).
    pub warnings: Vec<String>,
}

/// Read the data directory and decide the task and metrics.
pub fn setup(cfg: &CompareConfig) -> Result<Setup, Error> {
    let read = |name: &str| crate::read_examples(&cfg.data.join(name));
    let (train, mut test) = (read("train.jsonl")?, read("test.jsonl")?);
    if let Some(n) = cfg.limit {
        test.truncate(n);
    }
    let valid = if cfg.data.join("valid.jsonl").is_file() { read("valid.jsonl")? } else { vec![] };
    let references: Vec<String> = test.iter().map(|e| e.reference.clone()).collect();
    // Labels repeat over the training data too: small test sets alone say little.
    let all: Vec<String> =
        references.iter().chain(train.iter().map(|e| &e.reference)).cloned().collect();
    let task = Task::detect(&all);
    let rules_path = cfg.data.join("rules.toml");
    let rules = rules_path.is_file().then(|| crate::rules::Rules::read(&rules_path)).transpose()?;
    let metrics = crate::choose_metrics(&cfg.metrics, task, rules.as_ref())?;
    let mut warnings = vec![];
    if task == Task::Labels {
        let seen: std::collections::BTreeSet<String> =
            train.iter().map(|e| crate::metrics::normalize(&e.reference)).collect();
        let unseen: std::collections::BTreeSet<String> = references
            .iter()
            .map(|r| crate::metrics::normalize(r))
            .filter(|r| !seen.contains(r))
            .collect();
        if !unseen.is_empty() {
            let w = format!(
                "test labels never seen in training: {}",
                unseen.into_iter().collect::<Vec<_>>().join(", ")
            );
            tracing::warn!("{w}");
            warnings.push(w);
        }
    }
    Ok(Setup { train, valid, test, task, rules, metrics, warnings })
}

/// The primary metric of `model` with its named adapter `adapter`, bare prompt, on the test
/// set (for learning curves: no consistency runs, no latency).
pub fn score_finetuned(
    model: &Model,
    adapter: &str,
    cfg: &CompareConfig,
) -> Result<Estimate, Error> {
    let s = setup(cfg)?;
    let quick =
        RunSettings { seeds: 0, latency_samples: 0, reference_loss: false, ..cfg.run.clone() };
    let ft = Prompting { adapters: vec![(adapter.into(), 1.0)], system: None, shots: vec![] };
    let r = run_arm(model, &ft, &s.test, s.task, &s.metrics[..1], s.rules.as_ref(), &quick)?;
    Ok(r.metrics[&s.metrics[0]])
}

/// Run the comparison. `base` carries each of `cfg.adapters` as a named adapter.
/// `progress` hears what runs next (`prompted, 3-shot: 379 test examples`): an arm over a
/// long test set takes minutes.
pub fn compare(
    base: &Model,
    baseline: Option<&Model>,
    cfg: &CompareConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<Report, Error> {
    let Setup { train, valid, test, task, rules, metrics: metric_names, warnings } = setup(cfg)?;
    let primary = metric_names[0].clone();
    if cfg.shots.is_empty() {
        return Err(Error::Input("--shots needs at least one number".into()));
    }
    // The loss of the references says most without shots in the prompt, and costs a forward
    // pass per example: it is computed for the arms without shots.
    let run = |model: &Model, p: &Prompting, examples: &[Example]| {
        let s = RunSettings {
            reference_loss: cfg.run.reference_loss && p.shots.is_empty(),
            ..cfg.run.clone()
        };
        run_arm(model, p, examples, task, &metric_names, rules.as_ref(), &s)
    };
    let mut arms = vec![];
    // (arm index, validation score, its shots)
    type Best = (usize, f64, Vec<(String, String)>);
    let mut best: Option<Best> = None;
    if cfg.shot_draws == 0 {
        return Err(Error::Input("--shot-draws must be at least 1".into()));
    }
    if cfg.shot_draws > 1 && valid.is_empty() {
        return Err(Error::Input(format!(
            "--shot-draws {}: the draws are chosen among on valid.jsonl, and {} has none",
            cfg.shot_draws,
            cfg.data.display()
        )));
    }
    // Every draw first: a --shots beyond the training data fails before minutes of runs.
    let draws = cfg
        .shots
        .iter()
        .map(|&k| {
            let n = if k == 0 { 1 } else { cfg.shot_draws as u64 };
            let each = (0..n).map(|d| Ok((cfg.seed + d, draw_shots(&train, k, cfg.seed + d)?)));
            Ok((k, each.collect::<Result<Vec<_>, Error>>()?))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    for (k, candidates) in draws {
        // The best k (and the best draw of its shots) is chosen on the validation set, so that
        // the test set judges it fairly.
        // (seed, shots, validation score) of each draw.
        type Scored = (u64, Vec<(String, String)>, Option<f64>);
        let mut scored: Vec<Scored> = vec![];
        for (seed, shots) in candidates {
            let p = Prompting {
                adapters: vec![],
                system: cfg.system_prompt.clone(),
                shots: shots.clone(),
            };
            let score = if valid.is_empty() {
                None
            } else {
                let quick = RunSettings {
                    seeds: 0,
                    latency_samples: 0,
                    reference_loss: false,
                    ..cfg.run.clone()
                };
                let draw = if cfg.shot_draws > 1 && k > 0 {
                    format!(", draw {}", seed - cfg.seed + 1)
                } else {
                    String::new()
                };
                progress(&format!("prompted, {k}-shot{draw}: {} validation examples", valid.len()));
                let r =
                    run_arm(base, &p, &valid, task, &metric_names[..1], rules.as_ref(), &quick)?;
                Some(r.metrics[&primary].mean)
            };
            scored.push((seed, shots, score));
        }
        let spread = (scored.len() > 1).then(|| {
            let scores: Vec<f64> = scored.iter().filter_map(|s| s.2).collect();
            let mean = scores.iter().sum::<f64>() / scores.len() as f64;
            let lo = scores.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (scores, mean, [lo, hi])
        });
        // The first best draw: ties keep the lower seed.
        let best_draw = scored
            .iter()
            .enumerate()
            .max_by(|(i, a), (j, b)| {
                a.2.unwrap_or(0.0).total_cmp(&b.2.unwrap_or(0.0)).then(j.cmp(i))
            })
            .map(|(i, _)| i)
            .unwrap_or(0);
        let (chosen_seed, shots, valid_score) = scored.swap_remove(best_draw);
        let p =
            Prompting { adapters: vec![], system: cfg.system_prompt.clone(), shots: shots.clone() };
        progress(&format!("prompted, {k}-shot: {} test examples", test.len()));
        let result = run(base, &p, &test)?;
        let choose = valid_score.unwrap_or(result.metrics[&primary].mean);
        if best.as_ref().is_none_or(|(_, s, _)| choose > *s) {
            best = Some((arms.len(), choose, shots));
        }
        let mut a = arm(
            format!("prompted, {k}-shot"),
            "prompted",
            k,
            &base.source,
            valid_score,
            result,
            cfg,
        );
        a.draws = spread.map(|(scores, mean, range)| Draws { scores, mean, range, chosen_seed });
        arms.push(a);
    }
    let Some((best_i, _, best_shots)) = best else {
        return Err(Error::Input("--shots needs at least one number".into()));
    };
    arms[best_i].chosen = true;
    if cfg.adapters.is_empty() {
        return Err(Error::Input("no adapter to compare; hint: pass --adapter DIR".into()));
    }
    for (name, dir) in &cfg.adapters {
        let ft = Prompting { adapters: vec![(name.clone(), 1.0)], system: None, shots: vec![] };
        let training = training_cost(dir);
        progress(&format!("{name}: {} test examples", test.len()));
        let mut a =
            arm(name.clone(), "finetuned", 0, &base.source, None, run(base, &ft, &test)?, cfg);
        (a.adapter, a.training) = (Some(name.clone()), training.clone());
        arms.push(a);
        if cfg.system_prompt.is_some() {
            let ftp = Prompting { system: cfg.system_prompt.clone(), ..ft };
            progress(&format!("{name} + prompt: {} test examples", test.len()));
            let result = run(base, &ftp, &test)?;
            let mut a = arm(
                format!("{name} + prompt"),
                "finetuned+prompt",
                0,
                &base.source,
                None,
                result,
                cfg,
            );
            (a.adapter, a.training) = (Some(name.clone()), training);
            arms.push(a);
        }
    }
    if let Some(big) = baseline {
        let k = best_shots.len();
        let p =
            Prompting { adapters: vec![], system: cfg.system_prompt.clone(), shots: best_shots };
        progress(&format!("baseline, {k}-shot: {} test examples", test.len()));
        arms.push(arm(
            format!("baseline, {k}-shot"),
            "baseline",
            k,
            &big.source,
            None,
            run(big, &p, &test)?,
            cfg,
        ));
    }
    // The first adapter's, read with its arm.
    let training = arms.iter().find(|a| a.kind == "finetuned").and_then(|a| a.training.clone());
    let references: Vec<String> = test.iter().map(|e| e.reference.clone()).collect();
    let mut verdict = verdict(&arms, &primary, &references);
    verdict.push_str(&adapters_verdict(&arms, &primary, &cfg.run));
    let settings = serde_json::json!({
        "task": task,
        "metrics": metric_names,
        "data": cfg.data.display().to_string(),
        "test_examples": test.len(),
        "limit": cfg.limit,
        "valid_examples": valid.len(),
        "train_examples": train.len(),
        "system_prompt": cfg.system_prompt,
        "shots": cfg.shots,
        "shot_draws": cfg.shot_draws,
        "seed": cfg.seed,
        "seeds": cfg.run.seeds,
        "sampling": {"temperature": cfg.run.sampling.temperature, "top_p": cfg.run.sampling.top_p},
        "max_tokens": cfg.run.max_tokens,
        "latency_samples": cfg.run.latency_samples,
        "price_per_1k_tokens": cfg.price_per_1k_tokens,
        "model": base.source,
        "adapter": cfg.adapters[0].1.display().to_string(),
        "adapters": cfg.adapters.iter().map(|(n, d)| serde_json::json!({"name": n, "dir": d.display().to_string()})).collect::<Vec<_>>(),
        "baseline_model": baseline.map(|b| b.source.clone()),
        "rules": rules.as_ref().map(|r| r.rules.iter().map(|x| x.name.clone()).collect::<Vec<_>>()),
    });
    Ok(Report { arms, verdict, settings, training, warnings, learning_curve: None })
}

fn arm(
    name: String,
    kind: &'static str,
    shots: usize,
    model: &str,
    valid_score: Option<f64>,
    result: ArmResult,
    cfg: &CompareConfig,
) -> Arm {
    let tokens = result.prompt_tokens_per_query + result.completion_tokens_per_query;
    Arm {
        name,
        kind,
        shots,
        model: model.to_string(),
        chosen: false,
        adapter: None,
        training: None,
        draws: None,
        valid_score,
        cost_per_1m_queries: cfg.price_per_1k_tokens.map(|p| tokens / 1000.0 * p * 1e6),
        machine_hours_per_1m_queries: result.secs_per_query * 1e6 / 3600.0,
        result,
    }
}

fn fmt(e: &Estimate) -> String {
    format!("{:.3} [{:.3}, {:.3}]", e.mean, e.ci95[0], e.ci95[1])
}

/// The verdict: fine-tuned against the prompted arm chosen on validation, then the baseline;
/// `references` (the test answers) tell an arm stuck on one answer from one that is right.
pub fn verdict(arms: &[Arm], metric: &str, references: &[String]) -> String {
    let Some(ft) = arms.iter().find(|a| a.kind == "finetuned") else { return String::new() };
    let Some(pr) =
        arms.iter().find(|a| a.chosen).or_else(|| arms.iter().find(|a| a.kind == "prompted"))
    else {
        return String::new();
    };
    let (f, p) = (&ft.result.metrics[metric], &pr.result.metrics[metric]);
    let saved = pr.result.prompt_tokens_per_query - ft.result.prompt_tokens_per_query;
    let tokens = if saved > 0.0 {
        format!(
            " Fine-tuning needs {saved:.0} fewer prompt tokens per query ({:.0}% of the prompted arm's {:.0}).",
            100.0 * saved / pr.result.prompt_tokens_per_query.max(1e-9),
            pr.result.prompt_tokens_per_query
        )
    } else {
        String::new()
    };
    let mut v = if f.ci95[0] > p.ci95[1] {
        format!(
            "Fine-tuning wins on {metric}: {} against {} for the best prompt ({}); the 95% intervals do not overlap.{tokens}",
            fmt(f), fmt(p), pr.name
        )
    } else if p.mean >= f.mean {
        format!(
            "Prompting is good enough here: the best prompt ({}) scores {} on {metric} against the fine-tuned model's {}.{tokens}",
            pr.name, fmt(p), fmt(f)
        )
    } else {
        format!(
            "No clear winner on {metric}: fine-tuned {} against {} for the best prompt ({}); the 95% intervals overlap, so more test examples are needed to tell them apart.{tokens}",
            fmt(f), fmt(p), pr.name
        )
    };
    if let (Some(a), Some(b)) = (ft.result.consistency.seeds, pr.result.consistency.seeds) {
        v.push_str(&format!(
            " Answers agree across sampled runs {:.0}% of the time fine-tuned, {:.0}% prompted.",
            100.0 * a,
            100.0 * b
        ));
    }
    if let (Some(a), Some(b)) = (ft.result.consistency.groups, pr.result.consistency.groups) {
        v.push_str(&format!(" Across paraphrases: {:.0}% against {:.0}%.", 100.0 * a, 100.0 * b));
    }
    for a in [pr, ft] {
        if let Some((answer, share, expected)) = one_answer(&a.result.outputs, references) {
            v.push_str(&format!(
                " The {} arm answers `{answer}` to {:.0}% of the test examples (the references: {:.0}%): its agreement says little, and its {metric} comes mostly from that one answer.",
                a.name,
                100.0 * share,
                100.0 * expected
            ));
        }
    }
    if let Some(big) = arms.iter().find(|a| a.kind == "baseline") {
        let b = &big.result.metrics[metric];
        let how = if f.ci95[0] > b.ci95[1] {
            "beats"
        } else if b.ci95[0] > f.ci95[1] {
            "trails"
        } else {
            "is level with (overlapping intervals)"
        };
        let lat = if big.result.latency_ms.total_p50 > 0.0 {
            format!(
                ", answering in {:.0} ms against its {:.0} ms (median)",
                ft.result.latency_ms.total_p50, big.result.latency_ms.total_p50
            )
        } else {
            String::new()
        };
        v.push_str(&format!(
            " The fine-tuned small model {how} the larger prompted {} ({}){lat}.",
            big.model,
            fmt(b)
        ));
    }
    v
}

/// With several adapters: each later fine-tuned arm against the first (SFT + DPO against SFT
/// alone), by the paired difference of their scores on the same test examples.
fn adapters_verdict(arms: &[Arm], metric: &str, run: &RunSettings) -> String {
    let mut tuned = arms.iter().filter(|a| a.kind == "finetuned");
    let Some(first) = tuned.next() else { return String::new() };
    let mut v = String::new();
    for other in tuned {
        let (Some(a), Some(b)) = (first.result.scores.get(metric), other.result.scores.get(metric))
        else {
            continue;
        };
        let d = crate::metrics::paired_difference(a, b, run.bootstrap_seed, run.resamples);
        let how = if d.ci95[0] > 0.0 {
            "better: the paired 95% interval excludes 0"
        } else if d.ci95[1] < 0.0 {
            "worse: the paired 95% interval excludes 0"
        } else {
            "no clear difference: the paired 95% interval includes 0"
        };
        v.push_str(&format!(
            " `{}` against `{}` on {metric}: {:+.3} [{:+.3}, {:+.3}] ({how}).",
            other.name, first.name, d.mean, d.ci95[0], d.ci95[1]
        ));
        // And against the best prompt, as the verdict weighs the first adapter.
        if let Some(pr) = arms.iter().find(|a| a.chosen) {
            let (o, p) = (&other.result.metrics[metric], &pr.result.metrics[metric]);
            let than = if o.ci95[0] > p.ci95[1] {
                "above the best prompt's"
            } else if o.ci95[1] < p.ci95[0] {
                "below the best prompt's"
            } else {
                "overlapping the best prompt's"
            };
            v.push_str(&format!(" `{}` scores {} {than} {}.", other.name, fmt(o), fmt(p)));
        }
    }
    v
}

/// The answer an arm gives far more often than the references do — to at least half of 10 or
/// more examples, and 20 points above its share among the references — with both shares: an
/// arm that always says one label looks consistent, and as accurate as that label is common.
fn one_answer(outputs: &[String], references: &[String]) -> Option<(String, f64, f64)> {
    if outputs.len() < 10 || references.len() != outputs.len() {
        return None;
    }
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for o in outputs {
        *counts.entry(crate::metrics::normalize(o)).or_default() += 1;
    }
    let (answer, n) = counts.into_iter().max_by_key(|(_, n)| *n)?;
    let share = n as f64 / outputs.len() as f64;
    let expected = references.iter().filter(|r| crate::metrics::normalize(r) == answer).count()
        as f64
        / references.len() as f64;
    let shown: String = answer.chars().take(40).collect();
    (share >= 0.5 && share >= expected + 0.2).then_some((shown, share, expected))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Estimate;

    fn arm(kind: &'static str, mean: f64, lo: f64, hi: f64, prompt: f64) -> Arm {
        let mut metrics = std::collections::BTreeMap::new();
        metrics.insert("accuracy".to_string(), Estimate { mean, ci95: [lo, hi] });
        Arm {
            name: kind.to_string(),
            kind,
            shots: 0,
            model: "m".into(),
            chosen: kind == "prompted",
            valid_score: None,
            cost_per_1m_queries: None,
            machine_hours_per_1m_queries: 0.0,
            result: ArmResult {
                metrics,
                classification: None,
                rules: Default::default(),
                consistency: Default::default(),
                prompt_tokens_per_query: prompt,
                completion_tokens_per_query: 2.0,
                latency_ms: Default::default(),
                secs_per_query: 0.1,
                reference_loss: None,
                perplexity: None,
                outputs: vec![],
                scores: Default::default(),
            },
            adapter: None,
            training: None,
            draws: None,
        }
    }

    #[test]
    fn adapters_are_compared_pairwise() {
        let mut sft = arm("finetuned", 0.5, 0.3, 0.7, 40.0);
        sft.name = "sft".into();
        let mut dpo = sft.clone();
        dpo.name = "dpo".into();
        // dpo is right wherever sft is, and on 4 more of 20 examples: separately their
        // intervals would overlap, paired the gain is certain.
        let a: Vec<f64> = (0..20).map(|i| f64::from(i < 10)).collect();
        let b: Vec<f64> = (0..20).map(|i| f64::from(i < 14)).collect();
        sft.result.scores.insert("accuracy".into(), a.clone());
        dpo.result.scores.insert("accuracy".into(), b);
        let run = RunSettings {
            max_tokens: 8,
            seeds: 0,
            sampling: Default::default(),
            latency_samples: 0,
            max_batch: 1,
            bootstrap_seed: 0,
            resamples: 1000,
            reference_loss: false,
        };
        let v = adapters_verdict(&[sft.clone(), dpo], "accuracy", &run);
        assert!(v.contains("`dpo` against `sft` on accuracy: +0.200"), "{v}");
        assert!(v.contains("better"), "{v}");
        let mut same = sft.clone();
        same.name = "again".into();
        let mut flipped = a.clone();
        flipped.swap(0, 19);
        same.result.scores.insert("accuracy".into(), flipped);
        let v = adapters_verdict(&[sft, same], "accuracy", &run);
        assert!(v.contains("+0.000") && v.contains("no clear difference"), "{v}");
    }

    #[test]
    fn the_verdict_goes_both_ways() {
        let win = verdict(
            &[arm("prompted", 0.5, 0.4, 0.6, 200.0), arm("finetuned", 0.9, 0.8, 0.95, 40.0)],
            "accuracy",
            &[],
        );
        assert!(win.starts_with("Fine-tuning wins on accuracy"), "{win}");
        assert!(win.contains("160 fewer prompt tokens per query (80%"), "{win}");
        let enough = verdict(
            &[arm("prompted", 0.9, 0.8, 0.95, 200.0), arm("finetuned", 0.85, 0.75, 0.9, 40.0)],
            "accuracy",
            &[],
        );
        assert!(enough.starts_with("Prompting is good enough here"), "{enough}");
        let unclear = verdict(
            &[arm("prompted", 0.7, 0.6, 0.8, 200.0), arm("finetuned", 0.75, 0.65, 0.85, 40.0)],
            "accuracy",
            &[],
        );
        assert!(unclear.starts_with("No clear winner"), "{unclear}");
        let mut three =
            vec![arm("prompted", 0.5, 0.4, 0.6, 200.0), arm("finetuned", 0.9, 0.8, 0.95, 40.0)];
        three.push(arm("baseline", 0.6, 0.5, 0.7, 200.0));
        assert!(verdict(&three, "accuracy", &[]).contains("beats the larger prompted m"));
        // An arm that answers one label almost always is named as such.
        let mut constant =
            vec![arm("prompted", 0.65, 0.6, 0.7, 600.0), arm("finetuned", 0.8, 0.75, 0.85, 150.0)];
        constant[0].result.outputs =
            (0..20).map(|i| if i == 0 { "negative" } else { "Positive" }.to_string()).collect();
        constant[1].result.outputs =
            (0..20).map(|i| if i % 3 == 0 { "negative" } else { "positive" }.to_string()).collect();
        // References: 65% positive. The fine-tuned arm's 65% is the references' own share.
        let references: Vec<String> =
            (0..20).map(|i| if i % 3 == 0 { "negative" } else { "positive" }.to_string()).collect();
        let v = verdict(&constant, "accuracy", &references);
        assert!(
            v.contains("The prompted arm answers `positive` to 95% of the test examples (the references: 65%)"),
            "{v}"
        );
        assert!(!v.contains("The finetuned arm answers"), "{v}");
    }

    #[test]
    fn shots_are_drawn_by_seed_and_bounded() {
        let ex = |i: usize| Example {
            messages: vec![whet_infer::Message::new("user", format!("q{i}"))],
            reference: format!("a{i}"),
            group: None,
            at: String::new(),
        };
        let train: Vec<Example> = (0..10).map(ex).collect();
        let a = draw_shots(&train, 3, 1).unwrap();
        assert_eq!(a, draw_shots(&train, 3, 1).unwrap());
        assert_ne!(a, draw_shots(&train, 3, 2).unwrap());
        assert_eq!(a.len(), 3);
        let e = draw_shots(&train, 11, 1).unwrap_err().to_string();
        assert!(e.contains("--shots 11 is more than the 10"), "{e}");
    }

    /// A label set mostly of one label still gets shots of every label, in turn.
    #[test]
    fn label_shots_are_stratified() {
        let ex = |i: usize, label: &str| Example {
            messages: vec![whet_infer::Message::new("user", format!("q{i}"))],
            reference: label.into(),
            group: None,
            at: String::new(),
        };
        let train: Vec<Example> = (0..20)
            .map(|i| {
                ex(
                    i,
                    if i < 16 {
                        "positive"
                    } else if i < 19 {
                        "negative"
                    } else {
                        "neutral"
                    },
                )
            })
            .collect();
        for seed in 0..20 {
            let shots = draw_shots(&train, 3, seed).unwrap();
            let mut labels: Vec<&str> = shots.iter().map(|(_, r)| r.as_str()).collect();
            labels.sort();
            assert_eq!(labels, ["negative", "neutral", "positive"], "seed {seed}");
            let five = draw_shots(&train, 5, seed).unwrap();
            assert_eq!(
                five.iter().filter(|(_, r)| r == "neutral").count(),
                1,
                "one neutral exists"
            );
            assert_eq!(five.len(), 5);
        }
    }
}
