//! Text generation: KV-cached decoding with greedy or sampled tokens, stop tokens and strings,
//! and streaming of text as soon as it can no longer become part of a stop string.

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use std::time::Instant;
use whet_model::{Cache, Llama, ModelTokenizer};

/// Temperatures below this sample greedily (see `SamplingConfig::sampling`).
pub const GREEDY_BELOW: f64 = 1e-5;

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1.0 = off).
    pub top_p: f64,
    /// Divide positive logits of recently seen tokens by this (1.0 = off), as in CTRL.
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the sampler; the same seed gives the same text.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// A fresh sampler seeded with [`SamplingConfig::seed`].
    pub(crate) fn processor(&self) -> LogitsProcessor {
        LogitsProcessor::from_sampling(self.seed, self.sampling())
    }

    /// The next token from `logits` `[V]`, after the repetition penalty over the last
    /// `repeat_last_n` of `seen`.
    pub(crate) fn sample(
        &self,
        sampler: &mut LogitsProcessor,
        logits: &Tensor,
        seen: &[u32],
    ) -> Result<u32, Error> {
        if self.repetition_penalty == 1.0 {
            return Ok(sampler.sample(logits)?);
        }
        let recent = &seen[seen.len().saturating_sub(self.repeat_last_n)..];
        let logits = candle_transformers::utils::apply_repeat_penalty(
            logits,
            self.repetition_penalty,
            recent,
        )?;
        Ok(sampler.sample(&logits)?)
    }

    fn sampling(&self) -> Sampling {
        let (t, k, p) = (self.temperature, self.top_k, self.top_p);
        // Sampling tends to greedy as the temperature falls to 0, and below 1e-5 it is greedy
        // to within f32 anyway (a logit gap of 1e-3 already means odds of e^100); far below,
        // logits / t leaves f32's range and the probabilities become NaN (`1e-40` failed so).
        if t < GREEDY_BELOW {
            Sampling::ArgMax
        } else if k > 0 && p < 1.0 {
            Sampling::TopKThenTopP { k, p, temperature: t }
        } else if k > 0 {
            Sampling::TopK { k, temperature: t }
        } else if p < 1.0 {
            Sampling::TopP { p, temperature: t }
        } else {
            Sampling::All { temperature: t }
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Most new tokens to produce.
    pub max_tokens: usize,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Whether the tokenizer's end-of-sequence/end-of-turn ids end generation.
    pub stop_at_eos: bool,
    /// Token choice.
    pub sampling: SamplingConfig,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            stop: vec![],
            stop_at_eos: true,
            sampling: SamplingConfig::default(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token.
    Eos,
    /// A stop string.
    StopString,
    /// `max_tokens` reached.
    MaxTokens,
    /// The model's context is full.
    ContextFull,
}

impl StopReason {
    /// OpenAI's `finish_reason`: `stop` or `length`.
    pub fn finish_reason(self) -> &'static str {
        match self {
            StopReason::Eos | StopReason::StopString => "stop",
            StopReason::MaxTokens | StopReason::ContextFull => "length",
        }
    }
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated text (without the stop token or stop string).
    pub text: String,
    /// Generated ids, the stop token excluded.
    pub ids: Vec<u32>,
    /// Tokens of the prompt that were actually run (not reused from the cache).
    pub prefill_tokens: usize,
    /// Seconds spent on the prompt.
    pub prefill_secs: f64,
    /// Seconds spent producing tokens after the first.
    pub decode_secs: f64,
    /// Seconds from the request to its first generated token (queueing included when a batch
    /// engine ran it).
    pub first_token_secs: f64,
    /// Why it ended.
    pub stop_reason: StopReason,
}

/// The generated tokens of one sequence turned into text as it grows: each piece is passed on
/// as soon as it can no longer become part of a stop string (nor of an unfinished UTF-8
/// character), and the stop conditions are checked after every token.
pub(crate) struct TextStream {
    pub(crate) ids: Vec<u32>,
    /// Bytes of text already passed on.
    emitted: usize,
    max_stop: usize,
}

impl TextStream {
    pub(crate) fn new(cfg: &GenerateConfig) -> Self {
        let max_stop = cfg.stop.iter().map(String::len).max().unwrap_or(0);
        Self { ids: vec![], emitted: 0, max_stop }
    }

    /// Take token `next`, sampled with `cfg` after `cached` positions of a model with
    /// `context` positions: the text that became final, and why generation ends, if it does.
    pub(crate) fn push(
        &mut self,
        cfg: &GenerateConfig,
        next: u32,
        tokenizer: &ModelTokenizer,
        cached: usize,
        context: usize,
    ) -> Result<(Option<String>, Option<StopReason>), Error> {
        if cfg.stop_at_eos && tokenizer.stop_ids.contains(&next) {
            return Ok((None, Some(StopReason::Eos)));
        }
        self.ids.push(next);
        let text = tokenizer.decode(&self.ids)?;
        let emitted = self.emitted;
        if let Some(at) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            self.emitted = at.max(emitted);
            let piece = (at > emitted).then(|| text[emitted..at].to_string());
            return Ok((piece, Some(StopReason::StopString)));
        }
        // Hold back what could still grow into a stop string, and incomplete UTF-8.
        let mut safe = text.len().saturating_sub(self.max_stop.saturating_sub(1));
        if text.ends_with('\u{FFFD}') {
            safe = safe.min(text.len() - '\u{FFFD}'.len_utf8());
        }
        while !text.is_char_boundary(safe) {
            safe -= 1;
        }
        let piece = (safe > emitted).then(|| text[emitted..safe].to_string());
        self.emitted = self.emitted.max(safe);
        let stop = if self.ids.len() >= cfg.max_tokens {
            Some(StopReason::MaxTokens)
        } else if cached + 1 >= context {
            Some(StopReason::ContextFull)
        } else {
            None
        };
        Ok((piece, stop))
    }

    /// The whole text once generation has ended for `reason`, and what is left to pass on.
    pub(crate) fn finish(
        &self,
        tokenizer: &ModelTokenizer,
        reason: StopReason,
    ) -> Result<(String, Option<String>), Error> {
        let mut text = tokenizer.decode(&self.ids)?;
        if reason == StopReason::StopString {
            text.truncate(self.emitted);
            return Ok((text, None));
        }
        let rest = (text.len() > self.emitted).then(|| text[self.emitted..].to_string());
        Ok((text, rest))
    }
}

/// Errors of generation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] whet_model::Error),
    /// A tensor operation failed.
    #[error("generation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The prompt is empty or too long.
    #[error("{0}")]
    Prompt(String),
    /// A request names an adapter the model does not have.
    #[error("no adapter named `{name}`; loaded: {}", if loaded.is_empty() { "none".into() } else { loaded.join(", ") })]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The adapters the model has.
        loaded: Vec<String>,
    },
}

/// A model, its tokenizer and a KV cache that is reused when a new prompt extends the last one
/// (the next turn of a chat).
pub struct Session<'a> {
    model: &'a Llama,
    tokenizer: &'a ModelTokenizer,
    cache: Cache,
    /// Ids whose keys and values are in `cache`.
    cached: Vec<u32>,
}

impl<'a> Session<'a> {
    /// A session with an empty cache.
    pub fn new(model: &'a Llama, tokenizer: &'a ModelTokenizer) -> Self {
        Self { model, tokenizer, cache: Cache::new(model.config()), cached: vec![] }
    }

    /// Forget the cached conversation.
    pub fn reset(&mut self) {
        self.cache.reset();
        self.cached.clear();
    }

    /// Generate a continuation of `prompt`, calling `on_text` with each piece of text as soon
    /// as it is final.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        cfg: &GenerateConfig,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation, Error> {
        if prompt.is_empty() {
            return Err(Error::Prompt("the prompt is empty".into()));
        }
        let context = self.model.config().max_position_embeddings;
        if prompt.len() >= context {
            return Err(Error::Prompt(format!(
                "the prompt has {} tokens but the model's context is {context}",
                prompt.len()
            )));
        }
        // Reuse the cache only when it holds a strict prefix of this prompt.
        if !(self.cached.len() < prompt.len() && prompt.starts_with(&self.cached)) {
            self.reset();
        }
        let device = self.model.device().clone();
        let new = &prompt[self.cached.len()..];
        let start = Instant::now();
        let mut logits = self.forward(new, &device)?;
        let prefill_secs = start.elapsed().as_secs_f64();
        let prefill_tokens = new.len();
        self.cached.extend_from_slice(new);

        let mut sampler = cfg.sampling.processor();
        let mut out = TextStream::new(cfg);
        let decode_start = Instant::now();
        let stop_reason = loop {
            let next = cfg.sampling.sample(&mut sampler, &logits, &self.cached)?;
            let (piece, stop) = out.push(cfg, next, self.tokenizer, self.cached.len(), context)?;
            if let Some(piece) = piece {
                on_text(&piece);
            }
            if let Some(stop) = stop {
                break stop;
            }
            logits = self.forward(&[next], &device)?;
            self.cached.push(next);
        };
        let decode_secs = decode_start.elapsed().as_secs_f64();
        let (text, rest) = out.finish(self.tokenizer, stop_reason)?;
        if let Some(rest) = rest {
            on_text(&rest);
        }
        Ok(Generation {
            text,
            ids: out.ids,
            prefill_tokens,
            prefill_secs,
            decode_secs,
            first_token_secs: prefill_secs,
            stop_reason,
        })
    }

    /// Run `ids` through the model, continuing the cache; logits `[V]` of the last position.
    fn forward(&mut self, ids: &[u32], device: &Device) -> Result<Tensor, Error> {
        let input = Tensor::new(ids, device)?.unsqueeze(0)?;
        Ok(self.model.forward_last(&input, Some(&mut self.cache))?.squeeze(0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_modes_follow_the_settings() {
        let s = |t, k, p| {
            SamplingConfig { temperature: t, top_k: k, top_p: p, ..Default::default() }.sampling()
        };
        assert_eq!(s(0.0, 40, 0.9), Sampling::ArgMax);
        assert_eq!(s(0.7, 0, 1.0), Sampling::All { temperature: 0.7 });
        // Regression: `"temperature": 1e-40` failed with NaN probabilities (503 and a backtrace).
        assert_eq!(s(1e-40, 0, 1.0), Sampling::ArgMax);
        assert_eq!(s(f64::MIN_POSITIVE, 40, 0.9), Sampling::ArgMax);
        assert_eq!(s(0.7, 40, 1.0), Sampling::TopK { k: 40, temperature: 0.7 });
        assert_eq!(s(0.7, 0, 0.9), Sampling::TopP { p: 0.9, temperature: 0.7 });
        assert_eq!(s(0.7, 40, 0.9), Sampling::TopKThenTopP { k: 40, p: 0.9, temperature: 0.7 });
    }
}
