//! `whet data pairs`: a preference set from an SFT set. Each example's reference answer is the
//! chosen side and the model's own sampled answer to the same prompt the rejected one, so that
//! DPO learns from the mistakes the model actually makes (on-policy negatives), as
//! "self-play" preference pipelines (SPIN, on-policy DPO) build them.

use crate::run::{generate_each, messages, Model, Prompting};
use crate::{Error, Example};
use whet_infer::{GenerateConfig, Message, SamplingConfig};

/// How the rejected answers are drawn and which pairs are kept.
#[derive(Debug, Clone)]
pub struct PairSettings {
    /// Sampling of the rejected answers; each example draws with `seed + its index`.
    pub sampling: SamplingConfig,
    /// Most tokens per sampled answer.
    pub max_tokens: usize,
    /// Most sequences generated at once.
    pub max_batch: usize,
    /// Keep a pair only where the rejected answer scores below `threshold` on this metric
    /// (a [`crate::score`] name: `rules` checks the dataset's `rules.toml`); `None` keeps
    /// every pair whose answers differ.
    pub filter: Option<(String, f64)>,
}

/// One pair, in the conversation it answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// The conversation up to the answer (the example's system and user turns).
    pub prompt: Vec<Message>,
    /// The reference answer.
    pub chosen: String,
    /// The model's sampled answer.
    pub rejected: String,
}

/// Why examples made no pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// The sampled answer was empty.
    pub empty: usize,
    /// The sampled answer was the reference (after normalisation): no preference to learn.
    pub same: usize,
    /// The sampled answer passed the filter: the model already gets this one right.
    pub passing: usize,
}

impl Dropped {
    /// All the examples that made no pair.
    pub fn total(&self) -> usize {
        self.empty + self.same + self.passing
    }
}

/// Sample the model's answer to every example (batched by the engine) and pair it, as the
/// rejected side, with the reference.
pub fn make_pairs(
    model: &Model,
    prompting: &Prompting,
    examples: &[Example],
    s: &PairSettings,
    rules: Option<&crate::rules::Rules>,
) -> Result<(Vec<Pair>, Dropped), Error> {
    let mut pairs = vec![];
    let mut dropped = Dropped::default();
    // One request per example, each with its own seed: a draw that does not depend on how
    // the engine batches the rows.
    let jobs: Vec<(&Example, GenerateConfig)> = examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let sampling = SamplingConfig {
                seed: s.sampling.seed.wrapping_add(i as u64),
                ..s.sampling.clone()
            };
            (e, GenerateConfig { max_tokens: s.max_tokens, sampling, ..GenerateConfig::default() })
        })
        .collect();
    let (gens, _) = generate_each(model, prompting, &jobs, s.max_batch)?;
    for (e, g) in examples.iter().zip(gens) {
        let rejected = g.text.trim().to_string();
        if rejected.is_empty() {
            dropped.empty += 1;
            continue;
        }
        if crate::metrics::normalize(&rejected) == crate::metrics::normalize(&e.reference) {
            dropped.same += 1;
            continue;
        }
        if let Some((metric, threshold)) = &s.filter {
            if crate::score(metric, &rejected, &e.reference, rules) >= *threshold {
                dropped.passing += 1;
                continue;
            }
        }
        pairs.push(Pair {
            prompt: messages(&Prompting { shots: vec![], ..prompting.clone() }, e),
            chosen: e.reference.clone(),
            rejected,
        });
    }
    Ok((pairs, dropped))
}

impl Pair {
    /// The pair as a JSONL record in TRL's conversational preference format (`prompt` the
    /// messages up to the answer, `chosen` and `rejected` the assistant turn each), which
    /// `whet train --objective dpo` and TRL's `DPOTrainer` read.
    pub fn to_json(&self) -> serde_json::Value {
        let turn = |m: &Message| serde_json::json!({"role": m.role, "content": m.content});
        let answer = |text: &str| serde_json::json!([{"role": "assistant", "content": text}]);
        serde_json::json!({
            "prompt": self.prompt.iter().map(turn).collect::<Vec<_>>(),
            "chosen": answer(&self.chosen),
            "rejected": answer(&self.rejected),
        })
    }
}
