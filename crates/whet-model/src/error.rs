//! The errors whet-model returns. Each names the file (or source) and the problem in one line.

use std::path::PathBuf;

/// Result alias for whet-model.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the model needs does not exist.
    #[error("{}: file not found", path.display())]
    NotFound {
        /// The missing file.
        path: PathBuf,
    },
    /// A file exists but cannot be read as what it should be (truncated, corrupt, wrong format).
    #[error("{}: {msg}", path.display())]
    Corrupt {
        /// The unreadable file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// The model's configuration is invalid or not supported.
    #[error("{}: {msg}", path.display())]
    Config {
        /// The file the configuration came from (`config.json`, a GGUF file).
        path: PathBuf,
        /// The offending field and value.
        msg: String,
    },
    /// A tokenizer that cannot be built, or that does not fit the model.
    #[error("{}: {msg}", path.display())]
    Tokenizer {
        /// The tokenizer's file (`tokenizer.json`, a GGUF file).
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A model specification that names nothing whet can load.
    #[error("model `{spec}`: {msg}")]
    Source {
        /// The `--model` value as given.
        spec: String,
        /// Why it cannot be loaded.
        msg: String,
    },
    /// LoRA settings out of range, named by PEFT's field names (`r`, `lora_alpha`, ...); the
    /// caller names the file or flag they came from.
    #[error("{0}")]
    Lora(String),
    /// A named adapter that is not loaded.
    #[error("no adapter named `{name}`; loaded: {}", if loaded.is_empty() { "none".into() } else { loaded.join(", ") })]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The names that are loaded.
        loaded: Vec<String>,
    },
    /// A `--device` or `--dtype` value whet does not understand or cannot use.
    #[error("{0}")]
    Device(String),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn corrupt(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Corrupt { path: path.into(), msg: one_line(msg) }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Config { path: path.into(), msg: one_line(msg) }
    }
    pub(crate) fn tokenizer(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Tokenizer { path: path.into(), msg: one_line(msg) }
    }
}

/// Library errors (candle, serde) sometimes span lines or carry backtraces; whet's errors are one line.
pub(crate) fn one_line(msg: impl std::fmt::Display) -> String {
    let s = msg.to_string();
    let first = s.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    first.to_string()
}
