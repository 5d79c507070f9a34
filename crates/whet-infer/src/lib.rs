//! whet-infer: generation with a loaded model — KV cache, sampling, stop conditions, streaming —
//! and the generation benchmark.
#![warn(missing_docs)]

pub mod bench;
pub mod engine;
pub mod generate;

pub use engine::{generate_all, generate_forks, Engine, EngineConfig, Event, Request, Sink};
pub use generate::{Error, GenerateConfig, Generation, SamplingConfig, Session, StopReason};

pub use whet_data::{ChatTemplate, Message, TemplateError};
use whet_model::ModelTokenizer;

/// The model's own chat template (or the ChatML fallback), with its special tokens.
pub fn chat_template(tokenizer: &ModelTokenizer) -> Result<ChatTemplate, TemplateError> {
    ChatTemplate::from_model(
        tokenizer.chat_template.as_deref(),
        &tokenizer.template_source,
        tokenizer.bos_token.as_deref(),
        tokenizer.eos_token.as_deref(),
    )
}
