//! Hugging Face hub ids, resolved to a local snapshot directory through hf-hub's cache.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Resolve a hub id to a local snapshot directory through hf-hub, honouring `HF_HOME`,
/// `HF_ENDPOINT` and `HF_HUB_OFFLINE` (cache only, no network).
pub fn resolve_hub(id: &str) -> Result<PathBuf> {
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    let hub_err = |msg: String| Error::Source { spec: id.to_string(), msg };
    let api = if offline {
        None
    } else {
        Some(
            hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(true)
                .build()
                .map_err(|e| hub_err(format!("cannot start the hub client: {e}")))?,
        )
    };
    let get = |file: &str| -> std::result::Result<PathBuf, String> {
        match &api {
            None => hf_hub::Cache::from_env().model(id.to_string()).get(file).ok_or_else(|| {
                format!("`{file}` is not in the hub cache and HF_HUB_OFFLINE is set")
            }),
            Some(api) => api
                .model(id.to_string())
                .get(file)
                .map_err(|e| format!("cannot download `{file}`: {}", crate::error::one_line(e))),
        }
    };
    let config = get("config.json").map_err(hub_err)?;
    get("tokenizer.json").map_err(hub_err)?;
    let _optional = get("tokenizer_config.json");
    if let Err(single) = get("model.safetensors") {
        let index = get("model.safetensors.index.json")
            .map_err(|index| hub_err(format!("{single}; {index}")))?;
        let text = std::fs::read_to_string(&index).map_err(|e| Error::corrupt(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::corrupt(&index, format!("invalid JSON: {e}")))?;
        let shards: std::collections::BTreeSet<&str> = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| m.values().filter_map(|s| s.as_str()).collect())
            .unwrap_or_default();
        for shard in shards {
            get(shard).map_err(hub_err)?;
        }
    }
    // hf-hub lays every file of a revision out in one snapshot directory.
    Ok(config.parent().unwrap_or(Path::new(".")).to_path_buf())
}
