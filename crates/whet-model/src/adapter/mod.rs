//! LoRA adapters on disk in PEFT's format — `adapter_config.json` and
//! `adapter_model.safetensors` — so PEFT, transformers, vLLM and llama.cpp's converter read them:
//!
//! - [`config`]: `adapter_config.json`, one typed struct written and read ([`AdapterConfig`]),
//!   and the settings whet computes with, every field understood or refused by name
//!   ([`PeftAdapter`]);
//! - [`files`]: the tensors, in and out, and attaching them to the one Llama;
//! - [`gguf`]: the llama.cpp LoRA adapter GGUF;
//! - [`compat`]: what other runtimes would refuse or compute differently;
//! - [`registry`]: the names, ids and weights of the adapters a model applies beside its base.

pub mod compat;
pub mod config;
pub mod files;
pub mod gguf;
pub mod registry;

pub use compat::{check_for, Finding, Runtime};
pub use config::{AdapterConfig, ModuleSpec, OneOrList, PeftAdapter, UniformLora};
use files::attach;
pub use files::{read_tensors, save_adapter, write_safetensors, AdapterFiles};
pub use gguf::adapter_to_gguf;
pub use registry::Registry;

use crate::error::{Error, Result};
use crate::models::llama::Llama;
use std::path::Path;

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::corrupt(path, e)
}

/// A regular file's text. Anything else (a FIFO, a device) is refused before it is opened:
/// opening a FIFO blocks until someone writes to it.
fn read_text(path: &Path) -> Result<String> {
    regular_file(path)?;
    std::fs::read_to_string(path).map_err(|e| io(path, e))
}

fn regular_file(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Error::NotFound { path: path.to_path_buf() })
        }
        Err(e) => Err(io(path, e)),
        Ok(m) if !m.is_file() => Err(io(path, "not a regular file")),
        Ok(_) => Ok(()),
    }
}

/// Whether an `adapter_config.json` field holds anything but its no-op value (null, false, an
/// empty list or map, `bias` = `none`).
fn is_set(field: &str, value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Null => false,
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => !o.is_empty(),
        serde_json::Value::String(s) => !(field == "bias" && s == "none"),
        _ => true,
    }
}

/// Attach the adapter in `dir` (PEFT format: `adapter_config.json` and
/// `adapter_model.safetensors`, as PEFT or whet write them) to `model`, unmerged. Every field
/// that changes the computation is honoured or refused, and every tensor of the file must find
/// its module.
pub fn load_adapter(model: &mut Llama, dir: &Path) -> Result<PeftAdapter> {
    attach(model, dir, None)
}

/// [`load_adapter`] as a named inference-only adapter applied with `weight` beside the others
/// (see [`Llama::add_named_lora`]).
pub fn load_named_adapter(
    model: &mut Llama,
    name: &str,
    weight: f64,
    dir: &Path,
) -> Result<PeftAdapter> {
    attach(model, dir, Some((name, weight)))
}

/// Attach the adapter in `dir` as the one training continues, under `cfg` (which must have
/// its rank, alpha and targets, see [`PeftAdapter::uniform`]), with a frozen copy of it as the
/// reference model's adapter (see [`Llama::train_from_attached`]).
pub fn train_on_from(
    model: &mut Llama,
    dir: &Path,
    cfg: &crate::lora::LoraConfig,
) -> Result<PeftAdapter> {
    let files = AdapterFiles::read(dir)?;
    let path = files.config.path.clone();
    // One rank and alpha over named modules, or refused by the field that says otherwise;
    // each projection's rank, scale and presence against `cfg` is checked as it is taken on.
    files.config.uniform()?;
    let adapter = files.attach(model, None)?;
    model.train_from_attached(cfg).map_err(|e| Error::config(&path, e.to_string()))?;
    Ok(adapter)
}
