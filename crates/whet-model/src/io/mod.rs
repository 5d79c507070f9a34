//! Everything that reads or writes model files: GGUF ([`gguf`]), Hugging Face directories
//! ([`hf_dir`]), hub ids ([`hub`]), random presets ([`presets`]), tokenizers ([`tokenizer`]),
//! and writing models out ([`export`]). [`load`] turns a `--model` value into a loaded model.

pub mod export;
pub mod gguf;
pub mod gguf_vocab;
pub mod hf_dir;
pub mod hub;
pub mod presets;
pub mod tokenizer;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::models::llama::Llama;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use gguf::GgufFile;
use hf_dir::{load_hf_dir, read_config, tokenizer_from_dir};
use hub::resolve_hub;
use presets::{load_random, preset, PRESETS};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokenizer::ModelTokenizer;

/// Where the default model lives, relative to the working directory (see `scripts/fetch-model.sh`).
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The command that fetches the default model.
pub const FETCH_HINT: &str = "scripts/fetch-model.sh";

/// What a `--model` value names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A `.gguf` file.
    Gguf(PathBuf),
    /// A directory with `config.json`, safetensors weights and `tokenizer.json`.
    HfDir(PathBuf),
    /// A Hugging Face hub id (`org/name`), resolved through hf-hub's cache.
    Hub(String),
    /// A random-initialised preset (`random:tiny`, `random:smollm2-135m`).
    Random(String),
}

impl ModelSource {
    /// Classify a `--model` value. Paths that exist win over hub ids.
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(name) = spec.strip_prefix("random:") {
            return match preset(name) {
                Some(_) => Ok(ModelSource::Random(name.to_string())),
                None => Err(Error::Source {
                    spec: spec.into(),
                    msg: format!("unknown preset `{name}`; presets: {}", PRESETS.join(", ")),
                }),
            };
        }
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(ModelSource::HfDir(path.to_path_buf()));
        }
        if path.is_file() || spec.ends_with(".gguf") {
            // A missing .gguf is reported as a missing file when opened.
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        let parts: Vec<&str> = spec.split('/').collect();
        if parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.')) {
            return Ok(ModelSource::Hub(spec.to_string()));
        }
        Err(Error::Source {
            spec: spec.into(),
            msg: "no such file or directory, and not a hub id of the form `org/name`".into(),
        })
    }
}

/// A model ready to run: weights, configuration, tokenizer and where they came from.
pub struct LoadedModel {
    /// The network.
    pub model: Llama,
    /// Its validated configuration.
    pub config: Config,
    /// Its tokenizer and chat template.
    pub tokenizer: ModelTokenizer,
    /// Human-readable origin (`models/x.gguf (GGUF, Q4_1 dequantized to f32)`).
    pub source: String,
}

/// Load a model on `device` with weights in `dtype`. `seed` only matters for random presets.
pub fn load(source: &ModelSource, dtype: DType, device: &Device, seed: u64) -> Result<LoadedModel> {
    load_quantized(source, dtype, device, seed, None)
}

/// As [`load`], with every linear layer quantized to `quantize` as soon as its block is built
/// (see [`Llama::load_quantized`]): QLoRA's frozen base, never whole in f32 for random presets
/// and safetensors.
pub fn load_quantized(
    source: &ModelSource,
    dtype: DType,
    device: &Device,
    seed: u64,
    quantize: Option<GgmlDType>,
) -> Result<LoadedModel> {
    let mut m = match source {
        ModelSource::Gguf(path) => load_gguf(path, dtype, device, quantize),
        ModelSource::HfDir(dir) => load_hf_dir(dir, dtype, device, quantize),
        ModelSource::Hub(id) => load_hf_dir(&resolve_hub(id)?, dtype, device, quantize),
        ModelSource::Random(name) => load_random(name, dtype, device, seed, quantize),
    }?;
    if let Some(q) = quantize {
        m.source = format!("{}, linear layers quantized to {q:?}", m.source);
    }
    Ok(m)
}

/// Load only the tokenizer (and chat template) of a model, without its weights: what dataset
/// preparation needs. The vocabulary is still checked against the model's configuration.
pub fn load_tokenizer(source: &ModelSource) -> Result<ModelTokenizer> {
    match source {
        ModelSource::Gguf(path) => Ok(open_gguf(path)?.2),
        ModelSource::HfDir(dir) => tokenizer_from_dir(dir, &read_config(dir)?),
        ModelSource::Hub(id) => {
            let dir = resolve_hub(id)?;
            tokenizer_from_dir(&dir, &read_config(&dir)?)
        }
        ModelSource::Random(_) => ModelTokenizer::byte_level(),
    }
}

/// Only the tokenizer, with no model configuration at all: what `whet tokenize` needs, and all
/// that a vocabulary-only GGUF (llama.cpp's `ggml-vocab-*.gguf`) holds.
pub fn tokenizer_only(source: &ModelSource) -> Result<ModelTokenizer> {
    match source {
        ModelSource::Gguf(path) => ModelTokenizer::from_gguf(&GgufFile::open(path)?),
        ModelSource::HfDir(dir) => ModelTokenizer::from_dir(dir, &[]),
        ModelSource::Hub(id) => ModelTokenizer::from_dir(&resolve_hub(id)?, &[]),
        ModelSource::Random(_) => ModelTokenizer::byte_level(),
    }
}

/// Only the validated configuration of a model, without its weights or tokenizer.
pub fn config_only(source: &ModelSource) -> Result<Config> {
    match source {
        ModelSource::Gguf(path) => GgufFile::open(path)?.config_file()?.into_config(path),
        ModelSource::HfDir(dir) => read_config(dir),
        ModelSource::Hub(id) => read_config(&resolve_hub(id)?),
        ModelSource::Random(name) => preset(name).ok_or_else(|| Error::Source {
            spec: format!("random:{name}"),
            msg: format!("unknown preset; presets: {}", PRESETS.join(", ")),
        }),
    }
}

/// A GGUF file's header, validated configuration and tokenizer (checked against each other).
fn open_gguf(path: &Path) -> Result<(GgufFile, Config, ModelTokenizer)> {
    let gguf = GgufFile::open(path)?;
    let config = gguf.config_file()?.into_config(path)?;
    let tokenizer = ModelTokenizer::from_gguf(&gguf)?;
    tokenizer.check_fits(config.vocab_size, path)?;
    Ok((gguf, config, tokenizer))
}

fn load_gguf(
    path: &Path,
    dtype: DType,
    device: &Device,
    quantize: Option<GgmlDType>,
) -> Result<LoadedModel> {
    let (gguf, config, tokenizer) = open_gguf(path)?;
    let mut tensors = gguf.tensors(config.num_heads, config.num_kv_heads, dtype, device)?;
    // Some converters store a tied head anyway; the embedding is the one used.
    if config.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    let types: std::collections::BTreeSet<String> =
        gguf.content.tensor_infos.values().map(|t| format!("{:?}", t.ggml_dtype)).collect();
    let names: Vec<String> = tensors.keys().cloned().collect();
    let model =
        load_every_tensor(Box::new(tensors), names, &config, dtype, device, path, quantize)?;
    let types: Vec<String> = types.into_iter().collect();
    let source = format!("{} (GGUF {}, dequantized to {dtype:?})", path.display(), types.join("/"));
    Ok(LoadedModel { model, config, tokenizer, source })
}

/// [`Llama::load`] from `backend`, which holds the tensors `names`; a tensor the model does not
/// use is an error naming it (under its Hugging Face name): skipping it would silently change
/// the outputs of a model whet only half understands (a norm, a bias, a scaling table).
pub(crate) fn load_every_tensor(
    backend: Box<dyn SimpleBackend>,
    names: Vec<String>,
    config: &Config,
    dtype: DType,
    device: &Device,
    path: &Path,
    quantize: Option<GgmlDType>,
) -> Result<Llama> {
    let used = Arc::new(Mutex::new(BTreeSet::new()));
    let tracked = Tracked { inner: backend, used: used.clone() };
    let vb = VarBuilder::from_backend(Box::new(tracked), dtype, device.clone());
    let model = Llama::load_quantized(vb, config, quantize).map_err(|e| Error::corrupt(path, e))?;
    let used = crate::ops::lock(&used)?;
    let ignorable = |n: &str| {
        // Precomputed RoPE tables of old checkpoints; a tied head stored anyway.
        n.ends_with("rotary_emb.inv_freq") || (config.tie_word_embeddings && n == "lm_head.weight")
    };
    let mut unused: Vec<&String> =
        names.iter().filter(|n| !used.contains(n.as_str()) && !ignorable(n)).collect();
    unused.sort();
    if let Some(first) = unused.first() {
        return Err(Error::config(
            path,
            format!(
                "tensor `{first}` ({} unused in all) is not part of a `{}` model whet knows",
                unused.len(),
                config.arch.name()
            ),
        ));
    }
    Ok(model)
}

/// A backend that records which tensors the loader asked for.
struct Tracked {
    inner: Box<dyn SimpleBackend>,
    used: Arc<Mutex<BTreeSet<String>>>,
}

impl SimpleBackend for Tracked {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        crate::ops::lock(&self.used)?.insert(name.to_string());
        self.inner.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        crate::ops::lock(&self.used)?.insert(name.to_string());
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(ModelSource::parse("random:tiny").unwrap(), ModelSource::Random("tiny".into()));
        assert_eq!(
            ModelSource::parse("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap(),
            ModelSource::Hub("HuggingFaceTB/SmolLM2-135M-Instruct".into())
        );
        assert_eq!(ModelSource::parse("nope.gguf").unwrap(), ModelSource::Gguf("nope.gguf".into()));
        let err = ModelSource::parse("random:huge").unwrap_err().to_string();
        assert!(err.contains("unknown preset `huge`"), "{err}");
        assert!(ModelSource::parse("no/such/path").is_err());
    }
}
