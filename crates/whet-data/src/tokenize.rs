//! From examples to token ids and loss masks, through the model's own chat template.
//!
//! The mask marks the tokens the loss is computed on: by default every assistant turn including
//! its end-of-turn token (so the model learns to stop), never the prompt. Assistant spans are
//! found by rendering the conversation up to each turn, so any template works, including ones
//! that put text after the assistant's content.

use crate::format::{Example, Role, Turn};
use crate::template::{ChatTemplate, Message};
use std::ops::Range;
use tokenizers::Tokenizer;

/// Which tokens the loss covers.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum TrainOn {
    /// Every assistant turn (not marked `"train": false`).
    #[default]
    All,
    /// Only the last assistant turn.
    Last,
    /// Everything, prompts included (continued pre-training on conversations).
    Inputs,
}

impl TrainOn {
    /// The name flags and config files use.
    pub fn name(self) -> &'static str {
        match self {
            TrainOn::All => "all",
            TrainOn::Last => "last",
            TrainOn::Inputs => "inputs",
        }
    }
}

/// What to do with examples longer than `max_seq_len`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// Keep the first `max_seq_len` tokens (dropped if no trained token is left).
    #[default]
    Truncate,
    /// Leave the example out.
    Drop,
}

impl Overlong {
    /// The name flags and config files use.
    pub fn name(self) -> &'static str {
        match self {
            Overlong::Truncate => "truncate",
            Overlong::Drop => "drop",
        }
    }
}

/// A tokenized example.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tokenized {
    /// Token ids (of a preference pair: the prompt and the chosen answer).
    pub ids: Vec<u32>,
    /// 1 where the loss applies (the token is predicted from the ones before it).
    pub mask: Vec<u8>,
    /// Of a preference pair, the prompt and the rejected answer, masked the same way.
    pub rejected: Option<Box<Tokenized>>,
    /// Of an unpaired answer (KTO's data), whether it is desirable.
    pub desirable: Option<bool>,
}

impl Tokenized {
    /// Number of trained tokens.
    pub fn trained(&self) -> usize {
        self.mask.iter().filter(|m| **m == 1).count()
    }
}

/// A tokenized example with its rendered text.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The text the model sees.
    pub text: String,
    /// Byte range of each token in `text`.
    pub offsets: Vec<(usize, usize)>,
    /// Ids and mask.
    pub tokens: Tokenized,
}

/// Renders and tokenizes examples for one model.
pub struct Renderer<'a> {
    tokenizer: &'a Tokenizer,
    template: &'a ChatTemplate,
    train_on: TrainOn,
    /// Texts that end a turn (`<|im_end|>`, the EOS token); the loss stops after the first.
    end_of_turn: Vec<String>,
    /// Appended to plain text so the model learns where documents end.
    eos: Option<String>,
}

impl<'a> Renderer<'a> {
    /// A renderer for a model's tokenizer and template. `end_of_turn` lists the texts of the
    /// tokens that end a turn; the first is used as EOS for plain text.
    pub fn new(
        tokenizer: &'a Tokenizer,
        template: &'a ChatTemplate,
        train_on: TrainOn,
        end_of_turn: Vec<String>,
    ) -> Self {
        let eos = end_of_turn.first().cloned();
        Self { tokenizer, template, train_on, end_of_turn, eos }
    }

    /// The text the model sees and the byte ranges of it that are trained (of a preference
    /// pair, the chosen side's).
    pub fn render(&self, example: &Example) -> Result<(String, Vec<Range<usize>>), String> {
        match example {
            Example::Preference { prompt, chosen: answer, .. }
            | Example::Unpaired { prompt, completion: answer, .. } => {
                let messages: Vec<Message> = prompt
                    .iter()
                    .chain(answer)
                    .map(|t| Message::new(t.role.as_str(), &t.content))
                    .collect();
                let before = self
                    .template
                    .render(&messages[..prompt.len()], true)
                    .map_err(|e| e.to_string())?;
                let full = self.template.render(&messages, false).map_err(|e| e.to_string())?;
                let at = common_prefix(before.as_bytes(), full.as_bytes());
                let len = full.len();
                Ok((full, vec![at..len]))
            }
            Example::Text(text) => {
                let full = format!("{text}{}", self.eos.as_deref().unwrap_or(""));
                let len = full.len();
                Ok((full, vec![0..len]))
            }
            Example::Completion { prompt, completion } => {
                let turns = [Message::new("user", prompt), Message::new("assistant", completion)];
                self.render_chat(&turns, &[true])
            }
            Example::Chat(turns) => {
                let messages: Vec<Message> =
                    turns.iter().map(|t| Message::new(t.role.as_str(), &t.content)).collect();
                let last = turns.iter().rposition(|t| t.role == Role::Assistant);
                let trained: Vec<bool> = turns
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.role == Role::Assistant)
                    .map(|(i, t)| match self.train_on {
                        TrainOn::Last => Some(i) == last && t.train != Some(false),
                        _ => t.train != Some(false),
                    })
                    .collect();
                self.render_chat(&messages, &trained)
            }
        }
    }

    /// `trained[k]` says whether the k-th assistant turn is trained.
    fn render_chat(
        &self,
        messages: &[Message],
        trained: &[bool],
    ) -> Result<(String, Vec<Range<usize>>), String> {
        let full = self.template.render(messages, false).map_err(|e| e.to_string())?;
        if self.train_on == TrainOn::Inputs {
            let len = full.len();
            return Ok((full, vec![0..len]));
        }
        let mut ranges = vec![];
        let mut k = 0;
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let train = trained.get(k).copied().unwrap_or(false);
            k += 1;
            if !train {
                continue;
            }
            let before = self.template.render(&messages[..i], true).map_err(|e| e.to_string())?;
            let through =
                self.template.render(&messages[..=i], false).map_err(|e| e.to_string())?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(format!(
                    "the chat template does not render turn {} as a continuation of the turns before it, so its tokens cannot be masked",
                    i + 1
                ));
            }
            // The turn spans before.len()..through.len(); it ends at its first end-of-turn token
            // (which is trained: the model must learn to stop) — template text after that,
            // such as a newline, belongs to the frame, not to the answer.
            let span = &through[before.len()..];
            let content_at = span.find(m.content.as_str()).unwrap_or(0);
            let end = self
                .end_of_turn
                .iter()
                .filter_map(|t| {
                    span[content_at..].find(t.as_str()).map(|p| content_at + p + t.len())
                })
                .min()
                .unwrap_or(span.len());
            ranges.push(before.len()..before.len() + end);
        }
        Ok((full, ranges))
    }

    /// Render and tokenize; a token is trained when it starts inside a trained range.
    pub fn tokenize(&self, example: &Example) -> Result<Tokenized, String> {
        match example {
            Example::Preference { prompt, chosen, rejected } => {
                self.tokenize_pair(prompt, chosen, rejected)
            }
            Example::Unpaired { prompt, completion, desirable } => {
                self.tokenize_unpaired(prompt, completion, *desirable)
            }
            _ => Ok(self.encode(example)?.tokens),
        }
    }

    /// The token ids of `prompt` followed by `answer` rendered through the template (the
    /// prompt alone with the generation prompt when `answer` is `None`), without added special
    /// tokens: what TRL's trainers tokenize.
    fn render_ids(&self, prompt: &[Turn], answer: Option<&[Turn]>) -> Result<Vec<u32>, String> {
        let messages: Vec<Message> = prompt
            .iter()
            .chain(answer.unwrap_or_default())
            .map(|t| Message::new(t.role.as_str(), &t.content))
            .collect();
        let text = self.template.render(&messages, answer.is_none()).map_err(|e| e.to_string())?;
        let enc = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| format!("cannot tokenize: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// An unpaired answer as TRL's `KTOTrainer` tokenizes one: as a pair's side, the answer
    /// being every token after the prefix the prompt's tokens share with prompt + answer.
    fn tokenize_unpaired(
        &self,
        prompt: &[Turn],
        completion: &[Turn],
        desirable: bool,
    ) -> Result<Tokenized, String> {
        let (p, ids) = (self.render_ids(prompt, None)?, self.render_ids(prompt, Some(completion))?);
        let at = common_prefix(&p, &ids);
        let mask = (0..ids.len()).map(|k| u8::from(k >= at)).collect();
        let out = Tokenized { ids, mask, rejected: None, desirable: Some(desirable) };
        if out.trained() == 0 {
            return Err("the `completion` renders to no token after the prompt".into());
        }
        Ok(out)
    }

    /// A preference pair as TRL's `DPOTrainer` tokenizes one: the prompt rendered with the
    /// generation prompt, prompt + chosen and prompt + rejected rendered whole, each tokenized
    /// without added special tokens; the answer is every token after the longest prefix the
    /// prompt's tokens share with both (so the template's text after the answer, its
    /// end-of-turn and newline, is trained, as in TRL).
    fn tokenize_pair(
        &self,
        prompt: &[Turn],
        chosen: &[Turn],
        rejected: &[Turn],
    ) -> Result<Tokenized, String> {
        let render = |answer: Option<&[Turn]>| self.render_ids(prompt, answer);
        let (p, c, r) = (render(None)?, render(Some(chosen))?, render(Some(rejected))?);
        let at = common_prefix(&p, &c).min(common_prefix(&p, &r));
        let side = |ids: Vec<u32>| {
            let mask = (0..ids.len()).map(|k| u8::from(k >= at)).collect();
            Tokenized { ids, mask, ..Tokenized::default() }
        };
        let mut out = side(c);
        let rejected = side(r);
        for (name, t) in [("chosen", &out), ("rejected", &rejected)] {
            if t.trained() == 0 {
                return Err(format!("the `{name}` answer renders to no token after the prompt"));
            }
        }
        out.rejected = Some(Box::new(rejected));
        Ok(out)
    }

    /// Render and tokenize, keeping the text and each token's byte range in it (for previews).
    pub fn encode(&self, example: &Example) -> Result<Encoded, String> {
        let (text, ranges) = self.render(example)?;
        if example.is_scored() {
            // The (chosen) answer, masked as training masks it (by tokens, not bytes).
            let tokens = self.tokenize(example)?;
            let enc = self
                .tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| format!("cannot tokenize: {e}"))?;
            return Ok(Encoded { offsets: enc.get_offsets().to_vec(), text, tokens });
        }
        let enc = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| format!("cannot tokenize: {e}"))?;
        let tokens = self.mask(enc.get_ids(), enc.get_offsets(), &ranges);
        Ok(Encoded { offsets: enc.get_offsets().to_vec(), text, tokens })
    }

    /// Tokenize many examples at once (tokenizers encodes the batch in parallel).
    pub fn tokenize_batch(&self, examples: &[&Example]) -> Vec<Result<Tokenized, String>> {
        if examples.iter().any(|e| e.is_scored()) {
            return examples.iter().map(|e| self.tokenize(e)).collect();
        }
        let rendered: Vec<Result<(String, Vec<Range<usize>>), String>> =
            examples.iter().map(|e| self.render(e)).collect();
        let texts: Vec<String> =
            rendered.iter().filter_map(|r| r.as_ref().ok().map(|(t, _)| t.clone())).collect();
        let encoded = match self.tokenizer.encode_batch(texts, false) {
            Ok(e) => e,
            Err(e) => {
                return examples.iter().map(|_| Err(format!("cannot tokenize: {e}"))).collect()
            }
        };
        let mut encoded = encoded.into_iter();
        rendered
            .into_iter()
            .map(|r| {
                let (_, ranges) = r?;
                let enc = encoded.next().ok_or("tokenizer returned too few encodings")?;
                Ok(self.mask(enc.get_ids(), enc.get_offsets(), &ranges))
            })
            .collect()
    }

    fn mask(&self, ids: &[u32], offsets: &[(usize, usize)], ranges: &[Range<usize>]) -> Tokenized {
        let mask =
            offsets.iter().map(|(s, _)| u8::from(ranges.iter().any(|r| r.contains(s)))).collect();
        Tokenized { ids: ids.to_vec(), mask, ..Tokenized::default() }
    }
}

/// How many leading items `a` and `b` share.
fn common_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Apply the length policy; `None` when the example is dropped.
pub fn fit(mut t: Tokenized, max_seq_len: usize, policy: Overlong) -> Option<Tokenized> {
    if let Some(rejected) = t.rejected.take() {
        // A pair is kept or dropped whole; truncated, each side keeps its start (TRL's
        // `keep_start`), and a pair whose prompt alone fills the limit is dropped.
        let chosen = fit(t, max_seq_len, policy)?;
        let rejected = fit(*rejected, max_seq_len, policy)?;
        return Some(Tokenized { rejected: Some(Box::new(rejected)), ..chosen });
    }
    if t.ids.len() <= max_seq_len {
        return Some(t);
    }
    match policy {
        Overlong::Drop => None,
        Overlong::Truncate => {
            t.ids.truncate(max_seq_len);
            t.mask.truncate(max_seq_len);
            (t.trained() > 0).then_some(t)
        }
    }
}
