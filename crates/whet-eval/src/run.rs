//! Running one arm — a model, an optional adapter, an optional system prompt and k few-shot
//! examples — over a test set: batched generation, scores, answer consistency, prompt tokens,
//! unbatched latency, and the loss on the references.

use crate::{metrics, Error, Example, Task};
use candle_core::{DType, Tensor, D};
use serde::Serialize;
use std::collections::BTreeMap;
use whet_infer::{
    generate_all, generate_forks, ChatTemplate, EngineConfig, GenerateConfig, Message, Request,
    SamplingConfig, Session,
};
use whet_model::{Llama, ModelTokenizer};

/// A loaded model with its chat template.
pub struct Model {
    /// The network (named adapters loaded, none applied by default).
    pub model: Llama,
    /// Its tokenizer.
    pub tokenizer: ModelTokenizer,
    /// Its chat template.
    pub template: ChatTemplate,
    /// Where it came from.
    pub source: String,
}

/// How an arm prompts its model.
#[derive(Debug, Clone, Default)]
pub struct Prompting {
    /// The named adapters to apply, with their weights (none: the bare model).
    pub adapters: Vec<(String, f64)>,
    /// A system message before everything.
    pub system: Option<String>,
    /// Few-shot examples, as user/assistant pairs before the question.
    pub shots: Vec<(String, String)>,
}

/// Settings shared by every arm.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Most tokens per answer.
    pub max_tokens: usize,
    /// Sampled runs per example for consistency across seeds (0: none).
    pub seeds: usize,
    /// Sampling for those runs.
    pub sampling: SamplingConfig,
    /// Examples timed one at a time for latency (0: none).
    pub latency_samples: usize,
    /// Batch size of the engine.
    pub max_batch: usize,
    /// Seed of the bootstrap.
    pub bootstrap_seed: u64,
    /// Bootstrap resamples.
    pub resamples: usize,
    /// Whether to compute the loss of the reference answers (one forward pass per example).
    pub reference_loss: bool,
}

/// What one arm measured.
#[derive(Debug, Clone, Serialize)]
pub struct ArmResult {
    /// Per metric: mean and interval.
    pub metrics: BTreeMap<String, metrics::Estimate>,
    /// Per-label scores and the confusion matrix (label tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classification: Option<metrics::Classification>,
    /// Per-rule pass rates (with rules).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<String, f64>,
    /// Agreement of answers within paraphrase groups and across sampled seeds.
    pub consistency: Consistency,
    /// Mean prompt tokens per query.
    pub prompt_tokens_per_query: f64,
    /// Mean generated tokens per query.
    pub completion_tokens_per_query: f64,
    /// Unbatched latency.
    pub latency_ms: Latency,
    /// Batched throughput: machine-seconds per query.
    pub secs_per_query: f64,
    /// Mean loss (nats per token) of the reference answers, and its perplexity.
    pub reference_loss: Option<f64>,
    /// `exp(reference_loss)`.
    pub perplexity: Option<f64>,
    /// The greedy answers, in test order.
    pub outputs: Vec<String>,
    /// Per metric, each test example's score, in test order: arms over the same examples
    /// are compared pairwise (see [`metrics::paired_difference`]).
    #[serde(skip)]
    pub scores: BTreeMap<String, Vec<f64>>,
}

/// Answer agreement in 0..=1 (see [`crate::agreement`]); `None` where not measured.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Consistency {
    /// Mean pairwise agreement within paraphrase groups.
    pub groups: Option<f64>,
    /// Mean pairwise agreement of the sampled runs of each example.
    pub seeds: Option<f64>,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Latency {
    /// Time to the first token, median.
    pub ttft_p50: f64,
    /// Time to the first token, 95th percentile.
    pub ttft_p95: f64,
    /// Time to the whole answer, median.
    pub total_p50: f64,
    /// Time to the whole answer, 95th percentile.
    pub total_p95: f64,
    /// Generated tokens per second, median.
    pub tokens_per_sec: f64,
}

/// The messages `prompting` sends for `example`.
pub fn messages(prompting: &Prompting, example: &Example) -> Vec<Message> {
    let mut m = vec![];
    if let Some(s) = &prompting.system {
        m.push(Message::new("system", s));
    }
    for (q, a) in &prompting.shots {
        m.push(Message::new("user", q));
        m.push(Message::new("assistant", a));
    }
    // The example's own system message gives way to the arm's.
    m.extend(
        example
            .messages
            .iter()
            .filter(|x| !(prompting.system.is_some() && x.role == "system"))
            .cloned(),
    );
    m
}

fn prompt_ids(model: &Model, prompting: &Prompting, example: &Example) -> Result<Vec<u32>, Error> {
    let text = model
        .template
        .render(&messages(prompting, example), true)
        .map_err(|e| Error::Input(e.to_string()))?;
    Ok(model.tokenizer.encode(&text)?)
}

/// Greedy answers (and `extra` sampled runs each) for every example.
fn generate(
    model: &Model,
    prompting: &Prompting,
    examples: &[Example],
    cfg: &GenerateConfig,
    max_batch: usize,
) -> Result<(Vec<whet_infer::Generation>, f64), Error> {
    let jobs: Vec<(&Example, GenerateConfig)> = examples.iter().map(|e| (e, cfg.clone())).collect();
    generate_each(model, prompting, &jobs, max_batch)
}

/// As [`generate`], each example with its own settings (its own sampling seed).
pub(crate) fn generate_each(
    model: &Model,
    prompting: &Prompting,
    jobs: &[(&Example, GenerateConfig)],
    max_batch: usize,
) -> Result<(Vec<whet_infer::Generation>, f64), Error> {
    let adapters = prompting.adapters.clone();
    let mut requests = vec![];
    for (e, cfg) in jobs {
        requests.push(Request {
            prompt: prompt_ids(model, prompting, e)?,
            config: cfg.clone(),
            adapters: adapters.clone(),
        });
    }
    let start = std::time::Instant::now();
    let out = generate_all(
        &model.model,
        &model.tokenizer,
        requests,
        EngineConfig { max_batch, ..EngineConfig::default() },
    );
    let secs = start.elapsed().as_secs_f64();
    let gens = out.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok((gens, secs))
}

/// Run `prompting` on `model` over `examples`, scored with `metric_names`.
pub fn run_arm(
    model: &Model,
    prompting: &Prompting,
    examples: &[Example],
    task: Task,
    metric_names: &[String],
    rules: Option<&crate::rules::Rules>,
    s: &RunSettings,
) -> Result<ArmResult, Error> {
    let greedy = GenerateConfig { max_tokens: s.max_tokens, ..GenerateConfig::default() };
    let (gens, secs) = generate(model, prompting, examples, &greedy, s.max_batch)?;
    let outputs: Vec<String> = gens.iter().map(|g| g.text.trim().to_string()).collect();
    let references: Vec<String> = examples.iter().map(|e| e.reference.clone()).collect();
    let mut result_metrics = BTreeMap::new();
    let mut scores = BTreeMap::new();
    for m in metric_names {
        let values: Vec<f64> =
            outputs.iter().zip(&references).map(|(o, r)| crate::score(m, o, r, rules)).collect();
        result_metrics
            .insert(m.clone(), metrics::bootstrap(&values, s.bootstrap_seed, s.resamples));
        scores.insert(m.clone(), values);
    }
    let classification =
        (task == Task::Labels).then(|| metrics::classification(&outputs, &references));
    let rule_rates = rules
        .map(|r| {
            r.rules
                .iter()
                .map(|rule| {
                    let pass = outputs.iter().filter(|o| rule.check(o)).count();
                    (rule.name.clone(), pass as f64 / outputs.len() as f64)
                })
                .collect()
        })
        .unwrap_or_default();
    // Paraphrase groups: the greedy answers of the members should agree.
    let mut groups: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (e, o) in examples.iter().zip(&outputs) {
        if let Some(g) = &e.group {
            groups.entry(g).or_default().push(o.clone());
        }
    }
    let same = |a: &str, b: &str| crate::agreement(task, a, b);
    let group_scores: Vec<f64> =
        groups.values().filter_map(|v| metrics::pairwise_agreement(v, same)).collect();
    let mut consistency = Consistency { groups: mean(&group_scores), seeds: None };
    if s.seeds >= 2 {
        // Each example's prompt runs once; its cache is copied for every sampled run.
        let configs: Vec<GenerateConfig> = (0..s.seeds)
            .map(|seed| GenerateConfig {
                sampling: SamplingConfig { seed: seed as u64 + 1, ..s.sampling.clone() },
                ..greedy.clone()
            })
            .collect();
        let mut jobs = vec![];
        for e in examples {
            jobs.push((
                prompt_ids(model, prompting, e)?,
                prompting.adapters.clone(),
                configs.clone(),
            ));
        }
        let engine = EngineConfig { max_batch: s.max_batch, ..EngineConfig::default() };
        let mut per = vec![];
        for runs in generate_forks(&model.model, &model.tokenizer, jobs, engine) {
            let texts = runs
                .into_iter()
                .map(|g| g.map(|g| g.text.trim().to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            per.extend(metrics::pairwise_agreement(&texts, same));
        }
        consistency.seeds = mean(&per);
    }
    let latency_ms = latency(model, prompting, examples, &greedy, s.latency_samples)?;
    let (reference_loss, perplexity) =
        match s.reference_loss.then(|| reference_loss(model, prompting, examples)) {
            Some(Ok(l)) => (Some(l), Some(l.exp())),
            Some(Err(e)) => {
                tracing::warn!("reference loss not computed: {e}");
                (None, None)
            }
            None => (None, None),
        };
    let n = examples.len() as f64;
    Ok(ArmResult {
        metrics: result_metrics,
        classification,
        rules: rule_rates,
        consistency,
        prompt_tokens_per_query: gens.iter().map(|g| g.prefill_tokens as f64).sum::<f64>() / n,
        completion_tokens_per_query: gens.iter().map(|g| g.ids.len() as f64).sum::<f64>() / n,
        latency_ms,
        secs_per_query: secs / n,
        reference_loss,
        perplexity,
        outputs,
        scores,
    })
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// One request at a time, as a user waits for one answer: time to the first token and to the
/// end, over the first `n` examples.
fn latency(
    model: &Model,
    prompting: &Prompting,
    examples: &[Example],
    cfg: &GenerateConfig,
    n: usize,
) -> Result<Latency, Error> {
    if n == 0 {
        return Ok(Latency::default());
    }
    let weights: Vec<(&str, f64)> =
        prompting.adapters.iter().map(|(n, w)| (n.as_str(), *w)).collect();
    model.model.set_adapter_weights(&weights)?;
    let (mut ttft, mut total, mut tps) = (vec![], vec![], vec![]);
    for e in examples.iter().take(n) {
        let ids = prompt_ids(model, prompting, e)?;
        let g = Session::new(&model.model, &model.tokenizer).generate(&ids, cfg, |_| {})?;
        ttft.push(g.first_token_secs * 1e3);
        total.push((g.prefill_secs + g.decode_secs) * 1e3);
        if g.ids.len() > 1 {
            tps.push((g.ids.len() - 1) as f64 / g.decode_secs.max(1e-9));
        }
    }
    model.model.set_adapter_weights(&[])?;
    let p = whet_infer::bench::percentile;
    Ok(Latency {
        ttft_p50: p(&ttft, 50.0),
        ttft_p95: p(&ttft, 95.0),
        total_p50: p(&total, 50.0),
        total_p95: p(&total, 95.0),
        tokens_per_sec: p(&tps, 50.0),
    })
}

/// Mean negative log-likelihood (nats per token) of the reference answers given their
/// prompts, teacher-forced, as mlx-lm's `--test` reports it; the answer's tokens are what the
/// full conversation adds to the prompt.
fn reference_loss(
    model: &Model,
    prompting: &Prompting,
    examples: &[Example],
) -> Result<f64, Error> {
    let weights: Vec<(&str, f64)> =
        prompting.adapters.iter().map(|(n, w)| (n.as_str(), *w)).collect();
    model.model.set_adapter_weights(&weights)?;
    let (mut nll, mut count) = (0.0f64, 0usize);
    let result = (|| {
        for e in examples {
            let prompt = prompt_ids(model, prompting, e)?;
            let mut full_msgs = messages(prompting, e);
            full_msgs.push(Message::new("assistant", &e.reference));
            let text = model
                .template
                .render(&full_msgs, false)
                .map_err(|x| Error::Input(x.to_string()))?;
            let full = model.tokenizer.encode(&text)?;
            if full.len() <= prompt.len() || !full.starts_with(&prompt) {
                return Err(Error::Input(format!(
                    "{}: the template does not render the answer after the prompt",
                    e.at
                )));
            }
            let context = model.model.config().max_position_embeddings;
            if prompt.len() >= context {
                return Err(Error::Input(format!(
                    "{}: the prompt has {} tokens but the model's context is {context}",
                    e.at,
                    prompt.len()
                )));
            }
            let full = &full[..full.len().min(context)];
            let input = Tensor::new(full, model.model.device())?.unsqueeze(0)?;
            let targets = Tensor::new(&full[prompt.len()..], model.model.device())?;
            // The head runs only where an answer token is predicted: the [T, V] logits of
            // the whole prompt would cost more than the rest of the pass for small models.
            let h = model.model.hidden(&input, None)?.squeeze(0)?;
            let h = h.narrow(0, prompt.len() - 1, targets.dim(0)?)?;
            let logits = model.model.logits(&h)?.to_dtype(DType::F32)?;
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
            nll -= f64::from(picked.sum_all()?.to_scalar::<f32>()?);
            count += targets.dim(0)?;
        }
        Ok(())
    })();
    model.model.set_adapter_weights(&[])?;
    result?;
    Ok(nll / count.max(1) as f64)
}
