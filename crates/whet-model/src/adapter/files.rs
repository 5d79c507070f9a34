//! The adapter's tensors (`adapter_model.safetensors`) in and out, and attaching them to
//! the model.

use super::{io, regular_file, AdapterConfig, PeftAdapter};
use crate::error::{Error, Result};
use crate::lora::Lora;
use crate::models::llama::Llama;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

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
    // Serialized in memory and written plainly, so the file takes the user's umask like every
    // other file whet writes (safetensors' own writer makes it 0600).
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| io(path, e))?;
    std::fs::write(path, bytes).map_err(|e| io(path, e))
}

/// The tensors of `dir/adapter_model.safetensors`, named as PEFT saves them without the
/// adapter name (`lora_A.default.weight` -> `lora_A.weight`), every one checked finite. A path
/// that is not a regular file (a FIFO, a device) is refused before it is opened: opening a
/// FIFO blocks until someone writes to it.
pub fn read_tensors(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let path = dir.join("adapter_model.safetensors");
    regular_file(&path)?;
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| io(&path, format!("not a readable safetensors file: {e}")))?;
    let mut out = HashMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            return Err(io(
                &path,
                format!("tensor `{name}` holds {bad}: an adapter's weights must be finite numbers"),
            ));
        }
        out.insert(name.replace(".default.weight", ".weight"), t);
    }
    Ok(out)
}

/// A PEFT adapter directory read into memory (its config checked, its tensors finite) but
/// not yet attached to a model: the slow, file-reading half of a load, which a server does off
/// the thread that owns the model.
pub struct AdapterFiles {
    /// The adapter's configuration.
    pub config: PeftAdapter,
    tensors: HashMap<String, Tensor>,
    path: std::path::PathBuf,
}

impl AdapterFiles {
    /// Read `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn read(dir: &Path) -> Result<Self> {
        let config = PeftAdapter::read(dir)?;
        let path = dir.join("adapter_model.safetensors");
        if !path.exists() {
            let bin = dir.join("adapter_model.bin");
            if bin.exists() {
                return Err(Error::config(
                    &bin,
                    "PyTorch pickle adapters are not read (they can run code); hint: save it with safetensors: `model.save_pretrained(dir, safe_serialization=True)` in PEFT",
                ));
            }
            return Err(Error::NotFound { path });
        }
        let tensors = read_tensors(dir)?;
        Ok(Self { config, tensors, path })
    }

    /// Attach the adapter to `model`: as its one adapter (`named` = `None`) or as a named
    /// adapter with a weight.
    pub fn attach(self, model: &mut Llama, named: Option<(&str, f64)>) -> Result<PeftAdapter> {
        attach_files(model, self, named)
    }
}

pub(super) fn attach(
    model: &mut Llama,
    dir: &Path,
    named: Option<(&str, f64)>,
) -> Result<PeftAdapter> {
    attach_files(model, AdapterFiles::read(dir)?, named)
}

fn attach_files(
    model: &mut Llama,
    files: AdapterFiles,
    named: Option<(&str, f64)>,
) -> Result<PeftAdapter> {
    let AdapterFiles { config: adapter, mut tensors, path } = files;
    let (device, dtype) = (model.device().clone(), model.dtype());
    let build = |module: &str, in_dim: usize, out_dim: usize| -> Result<Option<Lora>> {
        if !adapter.targets(module) {
            return Ok(None);
        }
        let (r, _) = adapter.rank_alpha(module);
        let mut take = |which: &str, shape: (usize, usize)| -> Result<Tensor> {
            let name = format!("base_model.model.{module}.{which}.weight");
            let t = tensors
                .remove(&name)
                .ok_or_else(|| io(&path, format!("missing tensor `{name}`")))?;
            if t.dims() != [shape.0, shape.1] {
                return Err(io(
                    &path,
                    format!(
                        "tensor `{name}` has shape {:?}, the model needs {:?}",
                        t.dims(),
                        [shape.0, shape.1]
                    ),
                ));
            }
            Ok(t)
        };
        let a = take("lora_A", (r, in_dim))?;
        let b = take("lora_B", (out_dim, r))?;
        Ok(Some(Lora::from_tensors(&a, &b, adapter.scale(module), &device, dtype)?))
    };
    match named {
        None => model.attach_lora(build)?,
        Some((name, weight)) => model.add_named_lora(name, weight, build)?,
    }
    let mut left: Vec<&String> = tensors.keys().collect();
    left.sort();
    if let Some(first) = left.first() {
        return Err(io(
            &path,
            format!(
                "tensor `{first}` ({} in all) belongs to no module whet adapts (whet adapts q/k/v/o and gate/up/down projections)",
                left.len()
            ),
        ));
    }
    Ok(adapter)
}
