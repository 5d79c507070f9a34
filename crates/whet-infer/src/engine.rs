//! The batched generation engine shared by `whet serve`, `whet generate --batch-file` and
//! evaluation: many sequences decode together, each with its own KV cache, sampling settings,
//! stop conditions and adapters, joining and leaving between steps (continuous batching, as in
//! Orca, Yu et al. 2022, and vLLM).
//!
//! One [`Engine::step`] runs every running sequence's next tokens through one ragged forward
//! pass ([`Llama::forward_rows`]): a new sequence its prompt (in chunks of at most
//! [`EngineConfig::prefill_chunk`] tokens, so a long prompt does not stall the others for
//! long), the others the token they sampled last. Decoding is memory-bound — each step reads
//! every weight once — so 16 sequences cost little more per step than one.

use crate::generate::{Error, GenerateConfig, Generation, TextStream};
use candle_transformers::generation::LogitsProcessor;
use std::collections::VecDeque;
use std::time::Instant;
use whet_model::{Cache, Llama, ModelTokenizer, Row};

/// One generation request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt token ids (the chat template already applied).
    pub prompt: Vec<u32>,
    /// Length, stop conditions and sampling.
    pub config: GenerateConfig,
    /// Named adapters of the model (see [`Llama::add_named_lora`]) and their weights; empty for
    /// the base model.
    pub adapters: Vec<(String, f64)>,
}

/// What a sequence reports while it runs.
#[derive(Debug)]
pub enum Event {
    /// Text that became final (see [`crate::Session::generate`]).
    Text(String),
    /// The sequence ended; the last event.
    Done(Generation),
    /// The sequence failed (or its adapter was removed); the last event.
    Failed(String),
    /// The sequence is working but has no text to pass on: sent on admission, between the
    /// chunks of a long prompt, and for a token that completes no text yet (half a character,
    /// the start of a stop string), so that a receiver that is gone cancels the sequence there
    /// instead of after the whole prompt or answer has run.
    Progress {
        /// Prompt tokens in the cache so far.
        prefilled: usize,
        /// Prompt tokens in all.
        of: usize,
        /// Tokens generated so far.
        generated: usize,
    },
}

/// Receives a sequence's events; returning `false` (the receiver is gone: a client hung up)
/// cancels the sequence and frees its slot.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most sequences decoding at once; more wait in a queue.
    pub max_batch: usize,
    /// Most prompt tokens a sequence feeds per step.
    pub prefill_chunk: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { max_batch: 16, prefill_chunk: 256 }
    }
}

struct Seq {
    prompt: Vec<u32>,
    config: GenerateConfig,
    adapters: Vec<(String, f64)>,
    /// Adapter names and weights as one key: rows with equal keys are kept together.
    group: String,
    sink: Sink,
    /// More continuations of the same prompt, each with its own settings and sink: they fork
    /// from this sequence once its prompt is in, so the prompt runs once for all.
    forks: Vec<(GenerateConfig, Sink)>,
    cache: Cache,
    /// Prompt tokens and generated tokens whose keys and values are in `cache`.
    seen: Vec<u32>,
    /// Tokens to feed next step.
    pending: Vec<u32>,
    sampler: LogitsProcessor,
    submitted: Instant,
    admitted: Option<Instant>,
    prefill_secs: f64,
    first_token: Option<Instant>,
    out: TextStream,
}

impl Seq {
    /// Whether anyone still waits for this sequence's prompt: its own receiver, or a fork's.
    fn still_wanted(&mut self) -> bool {
        self.progress() || !self.forks.is_empty()
    }

    /// Tell the receiver how far the sequence is; `false`: the receiver is gone.
    fn progress(&mut self) -> bool {
        let (prefilled, of) = (self.seen.len().min(self.prompt.len()), self.prompt.len());
        let generated = self.out.ids.len();
        (self.sink)(Event::Progress { prefilled, of, generated })
    }
}

/// A continuous-batching generation engine. It holds no model: [`Engine::step`] borrows one,
/// so the owner can load and remove adapters between steps.
pub struct Engine {
    cfg: EngineConfig,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
}

impl Engine {
    /// An empty engine.
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            cfg: EngineConfig { max_batch: cfg.max_batch.max(1), ..cfg },
            waiting: VecDeque::new(),
            running: vec![],
        }
    }

    /// Queue a request; its events go to `sink`. A request the model cannot run (empty or
    /// too long a prompt, an unknown adapter) is refused here, before it joins a batch.
    pub fn submit(&mut self, model: &Llama, req: Request, sink: Sink) -> Result<(), Error> {
        self.submit_forks(model, req.prompt, req.adapters, vec![(req.config, sink)])
    }

    /// Queue several continuations of one prompt (the greedy answer and sampled ones, say),
    /// each with its own settings and sink: the prompt runs once, and its cache is copied for
    /// each continuation.
    pub fn submit_forks(
        &mut self,
        model: &Llama,
        prompt: Vec<u32>,
        adapters: Vec<(String, f64)>,
        forks: Vec<(GenerateConfig, Sink)>,
    ) -> Result<(), Error> {
        let context = model.config().max_position_embeddings;
        if prompt.is_empty() {
            return Err(Error::Prompt("the prompt is empty".into()));
        }
        if prompt.len() >= context {
            return Err(Error::Prompt(format!(
                "the prompt has {} tokens but the model's context is {context}",
                prompt.len()
            )));
        }
        let known = model.adapter_names();
        for (name, _) in &adapters {
            if !known.contains(name) {
                return Err(Error::UnknownAdapter { name: name.clone(), loaded: known });
            }
        }
        let mut forks = forks.into_iter();
        let Some((config, sink)) = forks.next() else { return Ok(()) };
        let group = adapters.iter().map(|(n, w)| format!("{n}={w}")).collect::<Vec<_>>();
        self.waiting.push_back(Seq {
            out: TextStream::new(&config),
            group: group.join(","),
            sampler: config.sampling.processor(),
            cache: Cache::new(model.config()),
            seen: vec![],
            pending: prompt.clone(),
            prompt,
            config,
            adapters,
            sink,
            forks: forks.collect(),
            submitted: Instant::now(),
            admitted: None,
            prefill_secs: 0.0,
            first_token: None,
        });
        Ok(())
    }

    /// Sequences running or waiting.
    pub fn len(&self) -> usize {
        self.waiting.len() + self.running.len()
    }

    /// Whether no sequence is running or waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// End every sequence that uses adapter `name` with [`Event::Failed`] (before the adapter
    /// is removed from the model).
    pub fn fail_adapter(&mut self, name: &str) {
        let msg = format!("adapter `{name}` was unloaded");
        let uses = |s: &Seq| s.adapters.iter().any(|(n, _)| n == name);
        let (gone, kept): (Vec<_>, Vec<_>) = self.running.drain(..).partition(|s| uses(s));
        self.running = kept;
        let (gone_waiting, kept): (Vec<_>, Vec<_>) = self.waiting.drain(..).partition(|s| uses(s));
        self.waiting = kept.into();
        for mut s in gone.into_iter().chain(gone_waiting) {
            (s.sink)(Event::Failed(msg.clone()));
        }
    }

    /// Admit waiting sequences up to the batch size, run one step of every running sequence,
    /// pass on their text, and retire those that ended (or whose receiver is gone). A failed
    /// forward pass fails the sequences of this step, and only those.
    pub fn step(&mut self, model: &Llama, tokenizer: &ModelTokenizer) {
        while self.running.len() < self.cfg.max_batch {
            let Some(mut s) = self.waiting.pop_front() else { break };
            if !s.still_wanted() {
                continue; // its receiver went away while it waited
            }
            s.admitted = Some(Instant::now());
            self.running.push(s);
        }
        if self.running.is_empty() {
            return;
        }
        // Neighbours with the same adapters share their LoRA matmuls.
        self.running.sort_by(|a, b| a.group.cmp(&b.group));
        let chunk = self.cfg.prefill_chunk.max(1);
        let feeds: Vec<Vec<u32>> = self
            .running
            .iter_mut()
            .map(|s| {
                let n = s.pending.len().min(chunk);
                s.pending.drain(..n).collect()
            })
            .collect();
        let logits = {
            let mut rows: Vec<Row> = self
                .running
                .iter_mut()
                .zip(&feeds)
                .map(|(s, ids)| Row { ids, cache: &mut s.cache, adapters: &s.adapters })
                .collect();
            model.forward_rows(&mut rows)
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                let msg = format!("generation failed: {e}");
                for mut s in self.running.drain(..) {
                    (s.sink)(Event::Failed(msg.clone()));
                }
                return;
            }
        };
        let context = model.config().max_position_embeddings;
        let mut keep = Vec::with_capacity(self.running.len());
        for (i, (mut s, fed)) in self.running.drain(..).zip(feeds).enumerate() {
            s.seen.extend_from_slice(&fed);
            if !s.pending.is_empty() {
                if s.still_wanted() {
                    keep.push(s); // the prompt is not all in yet
                }
                continue;
            }
            // The prompt is in: the other continuations start here, from the same logits.
            let mut seqs = vec![];
            for (config, sink) in std::mem::take(&mut s.forks) {
                match s.cache.fork() {
                    Ok(cache) => seqs.push(Seq {
                        out: TextStream::new(&config),
                        sampler: config.sampling.processor(),
                        config,
                        sink,
                        cache,
                        group: s.group.clone(),
                        seen: s.seen.clone(),
                        pending: vec![],
                        prompt: s.prompt.clone(),
                        adapters: s.adapters.clone(),
                        forks: vec![],
                        submitted: s.submitted,
                        admitted: s.admitted,
                        prefill_secs: 0.0,
                        first_token: None,
                    }),
                    Err(e) => {
                        let mut sink = sink;
                        sink(Event::Failed(format!("cannot copy the prompt's cache: {e}")));
                    }
                }
            }
            seqs.insert(0, s);
            for mut s in seqs {
                match advance(&mut s, i, &logits, tokenizer, context) {
                    Ok(Some(ended)) => {
                        (s.sink)(ended);
                    }
                    Ok(None) => keep.push(s),
                    Err(e) => {
                        (s.sink)(Event::Failed(e.to_string()));
                    }
                }
            }
        }
        self.running = keep;
    }

    /// Run every queued request to its end.
    pub fn run(&mut self, model: &Llama, tokenizer: &ModelTokenizer) {
        while !self.is_empty() {
            self.step(model, tokenizer);
        }
    }
}

/// Sample row `i`'s next token and pass its text on: the last event when the sequence ends,
/// `None` while it goes on (its next token is then pending). A cancelled sequence ends with
/// a `Failed` event its sink (gone) ignores.
fn advance(
    s: &mut Seq,
    i: usize,
    logits: &candle_core::Tensor,
    tokenizer: &ModelTokenizer,
    context: usize,
) -> Result<Option<Event>, Error> {
    let now = Instant::now();
    if s.first_token.is_none() {
        s.prefill_secs = (now - s.admitted.unwrap_or(s.submitted)).as_secs_f64();
        s.first_token = Some(now);
    }
    let next = s.config.sampling.sample(&mut s.sampler, &logits.get(i)?, &s.seen)?;
    let (piece, stop) = s.out.push(&s.config, next, tokenizer, s.seen.len(), context)?;
    let still_wanted = match piece {
        Some(piece) => (s.sink)(Event::Text(piece)),
        None => s.progress(),
    };
    if !still_wanted {
        return Ok(Some(Event::Failed("cancelled".into())));
    }
    let Some(reason) = stop else {
        s.pending.push(next);
        return Ok(None);
    };
    let (text, rest) = s.out.finish(tokenizer, reason)?;
    if let Some(rest) = rest {
        if !(s.sink)(Event::Text(rest)) {
            return Ok(Some(Event::Failed("cancelled".into())));
        }
    }
    let first = s.first_token.unwrap_or(now);
    Ok(Some(Event::Done(Generation {
        text,
        ids: std::mem::take(&mut s.out.ids),
        prefill_tokens: s.prompt.len(),
        prefill_secs: s.prefill_secs,
        decode_secs: (Instant::now() - first).as_secs_f64(),
        first_token_secs: (first - s.submitted).as_secs_f64(),
        stop_reason: reason,
    })))
}

/// Generate every request, `cfg.max_batch` at a time; the results in the requests' order.
pub fn generate_all(
    model: &Llama,
    tokenizer: &ModelTokenizer,
    requests: Vec<Request>,
    cfg: EngineConfig,
) -> Vec<Result<Generation, Error>> {
    let jobs = requests.into_iter().map(|r| (r.prompt, r.adapters, vec![r.config])).collect();
    generate_forks(model, tokenizer, jobs, cfg)
        .into_iter()
        .map(|mut v| v.pop().unwrap_or_else(|| Err(Error::Prompt("no result".into()))))
        .collect()
}

/// A prompt, its adapters, and the settings of each continuation (see [`generate_forks`]).
pub type ForkJob = (Vec<u32>, Vec<(String, f64)>, Vec<GenerateConfig>);

/// For each (prompt, adapters, settings), one generation per settings, the prompt run once
/// (see [`Engine::submit_forks`]); results in order.
pub fn generate_forks(
    model: &Llama,
    tokenizer: &ModelTokenizer,
    jobs: Vec<ForkJob>,
    cfg: EngineConfig,
) -> Vec<Vec<Result<Generation, Error>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut engine = Engine::new(cfg);
    let mut out: Vec<Vec<Option<Result<Generation, Error>>>> =
        jobs.iter().map(|(_, _, c)| (0..c.len()).map(|_| None).collect()).collect();
    for (i, (prompt, adapters, configs)) in jobs.into_iter().enumerate() {
        let forks = configs
            .into_iter()
            .enumerate()
            .map(|(j, config)| {
                let tx = tx.clone();
                let sink: Sink = Box::new(move |e| {
                    match e {
                        Event::Text(_) | Event::Progress { .. } => {}
                        Event::Done(g) => drop(tx.send((i, j, Ok(g)))),
                        Event::Failed(m) => drop(tx.send((i, j, Err(Error::Prompt(m))))),
                    }
                    true
                });
                (config, sink)
            })
            .collect();
        if let Err(e) = engine.submit_forks(model, prompt, adapters, forks) {
            let msg = e.to_string();
            for slot in &mut out[i] {
                *slot = Some(Err(Error::Prompt(msg.clone())));
            }
        }
    }
    drop(tx);
    engine.run(model, tokenizer);
    for (i, j, r) in rx.try_iter() {
        out[i][j] = Some(r);
    }
    out.into_iter()
        .map(|v| {
            v.into_iter()
                .map(|r| r.unwrap_or_else(|| Err(Error::Prompt("the sequence never ended".into()))))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::StopReason;

    #[test]
    fn finish_reasons_follow_openai() {
        assert_eq!(StopReason::Eos.finish_reason(), "stop");
        assert_eq!(StopReason::MaxTokens.finish_reason(), "length");
    }
}
