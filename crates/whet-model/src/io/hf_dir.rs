//! Hugging Face model directories: `config.json`, safetensors weights (one file or shards with
//! an index) and the tokenizer files.

use crate::config::{Config, ConfigFile};
use crate::error::{Error, Result};
use crate::io::tokenizer::ModelTokenizer;
use crate::io::LoadedModel;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

pub(crate) fn tokenizer_from_dir(dir: &Path, config: &Config) -> Result<ModelTokenizer> {
    let tokenizer = ModelTokenizer::from_dir(dir, &config.eos_token_ids)?;
    tokenizer.check_fits(config.vocab_size, &dir.join("tokenizer.json"))?;
    Ok(tokenizer)
}

pub(crate) fn read_config(dir: &Path) -> Result<Config> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound { path: config_path.clone() },
        _ => Error::corrupt(&config_path, e),
    })?;
    let file: ConfigFile = serde_json::from_str(&text)
        .map_err(|e| Error::config(&config_path, format!("invalid model config: {e}")))?;
    file.into_config(&config_path)
}

pub(crate) fn load_hf_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
    quantize: Option<candle_core::quantized::GgmlDType>,
) -> Result<LoadedModel> {
    let config = read_config(dir)?;
    let tokenizer = tokenizer_from_dir(dir, &config)?;
    let files = safetensors_files(dir)?;
    for f in &files {
        // Parse every header first so a corrupt or truncated shard is named before use.
        // SAFETY: the file is only read; whet never writes to model files it maps.
        unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }
            .map_err(|e| Error::corrupt(f, format!("not a readable safetensors file: {e}")))?;
    }
    // SAFETY: as above; weights are memory-mapped read-only.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| Error::corrupt(dir, e))?;
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    let model =
        crate::io::load_every_tensor(Box::new(st), names, &config, dtype, device, dir, quantize)?;
    let source = format!("{} (safetensors, {dtype:?})", dir.display());
    Ok(LoadedModel { model, config, tokenizer, source })
}

/// `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(Error::NotFound { path: single });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::corrupt(&index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::corrupt(&index, format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::corrupt(&index, "missing object `weight_map`"))?;
    let mut shards: Vec<String> =
        map.values().filter_map(|s| s.as_str().map(str::to_string)).collect();
    shards.sort();
    shards.dedup();
    shards
        .into_iter()
        .map(|s| {
            let p = dir.join(&s);
            if p.exists() {
                Ok(p)
            } else {
                Err(Error::NotFound { path: p })
            }
        })
        .collect()
}
