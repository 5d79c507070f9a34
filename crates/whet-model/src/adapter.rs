//! LoRA adapters on disk in PEFT's format — `adapter_config.json` and
//! `adapter_model.safetensors` — so PEFT, transformers, vLLM and llama.cpp's converter read them.

use crate::error::{Error, Result};
use crate::lora::LoraConfig;
use crate::models::llama::Llama;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// `adapter_config.json`, with PEFT's field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// Always `CAUSAL_LM`.
    pub task_type: String,
    /// The base model the adapter was trained on.
    pub base_model_name_or_path: Option<String>,
    /// Rank.
    pub r: usize,
    /// Scaling numerator.
    pub lora_alpha: f64,
    /// Dropout used in training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Wrapped modules.
    pub target_modules: Vec<String>,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// Always `none`: biases are not trained.
    #[serde(default = "none")]
    pub bias: String,
    /// Always false: weights are `[out, in]`.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Always null: no fully trained modules.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Saved adapters are for inference.
    #[serde(default)]
    pub inference_mode: bool,
}

fn none() -> String {
    "none".into()
}

impl AdapterConfig {
    /// The PEFT description of `cfg`.
    pub fn from_lora(cfg: &LoraConfig, base_model: &str) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            base_model_name_or_path: Some(base_model.to_string()),
            r: cfg.rank,
            lora_alpha: cfg.alpha,
            lora_dropout: cfg.dropout,
            target_modules: cfg.targets.clone(),
            use_rslora: cfg.rslora,
            bias: "none".into(),
            fan_in_fan_out: false,
            modules_to_save: None,
            inference_mode: true,
        }
    }
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::corrupt(path, e)
}

/// Write the model's adapters into `dir` (created if needed).
pub fn save_adapter(model: &Llama, dir: &Path, base_model: &str) -> Result<()> {
    let cfg = model.lora_config().ok_or_else(|| Error::Source {
        spec: base_model.into(),
        msg: "the model has no adapters to save".into(),
    })?;
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let config = AdapterConfig::from_lora(cfg, base_model);
    let path = dir.join("adapter_config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap_or_default())
        .map_err(|e| io(&path, e))?;
    let tensors: Vec<(String, Tensor)> =
        model.lora_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)
}

/// Write f32 tensors with PEFT's `{"format": "pt"}` metadata.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut data = vec![];
    for (name, t) in tensors {
        let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let bytes: Vec<u8> =
            t.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect();
        data.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views = data
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| io(path, e))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| io(path, e))
}

/// Read `adapter_config.json` from an adapter directory.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound { path: path.clone() },
        _ => io(&path, e),
    })?;
    let cfg: AdapterConfig = serde_json::from_str(&text)
        .map_err(|e| Error::config(&path, format!("invalid adapter config: {e}")))?;
    if cfg.peft_type != "LORA" {
        return Err(Error::config(
            &path,
            format!("`peft_type` = `{}`; whet reads LORA adapters", cfg.peft_type),
        ));
    }
    Ok(cfg)
}

/// Attach the adapter in `dir` (PEFT format) to `model`.
pub fn load_adapter(model: &mut Llama, dir: &Path) -> Result<AdapterConfig> {
    let cfg = read_adapter_config(dir)?;
    let in_file = |e: Error| match e {
        Error::Lora(msg) => Error::config(dir.join("adapter_config.json"), msg),
        e => e,
    };
    let lora =
        LoraConfig::new(cfg.r, cfg.lora_alpha, 0.0, &cfg.target_modules.join(","), cfg.use_rslora)
            .map_err(in_file)?;
    model.add_lora(&lora, 0).map_err(in_file)?;
    let path = dir.join("adapter_model.safetensors");
    if !path.exists() {
        return Err(Error::NotFound { path });
    }
    let tensors = candle_core::safetensors::load(&path, model.device())
        .map_err(|e| io(&path, format!("not a readable safetensors file: {e}")))?;
    // PEFT may keep the adapter name in keys (`lora_A.default.weight`) when saved by hand.
    let tensors: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (k.replace(".default.weight", ".weight"), v)).collect();
    for (name, var) in model.lora_vars() {
        let t = tensors.get(&name).ok_or_else(|| io(&path, format!("missing tensor `{name}`")))?;
        if t.dims() != var.dims() {
            return Err(io(
                &path,
                format!(
                    "tensor `{name}` has shape {:?}, the model needs {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(cfg)
}
