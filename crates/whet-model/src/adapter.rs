//! LoRA adapters on disk in PEFT's format — `adapter_config.json` and
//! `adapter_model.safetensors` — so PEFT, transformers, vLLM and llama.cpp's converter read them.

use crate::error::{Error, Result};
use crate::lora::{Lora, LoraConfig};
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
    // Serialized in memory and written plainly, so the file takes the user's umask like every
    // other file whet writes (safetensors' own writer makes it 0600).
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| io(path, e))?;
    std::fs::write(path, bytes).map_err(|e| io(path, e))
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

/// Which modules an adapter wraps: PEFT's `target_modules` as a list of names (a module whose
/// path is one, or ends in `.` + one) or a regular expression the whole path must match.
#[derive(Debug)]
enum Modules {
    List(Vec<String>),
    Regex(fancy_regex::Regex),
}

impl Modules {
    fn parse(v: &serde_json::Value, field: &str, path: &Path) -> Result<Option<Self>> {
        match v {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::String(re) => fancy_regex::Regex::new(&format!("^(?:{re})$"))
                .map(|r| Some(Modules::Regex(r)))
                .map_err(|e| Error::config(path, format!("`{field}` = `{re}`: {e}"))),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        Error::config(path, format!("`{field}` must list strings, got `{x}`"))
                    })
                })
                .collect::<Result<_>>()
                .map(|l| Some(Modules::List(l))),
            other => Err(Error::config(
                path,
                format!("`{field}` = `{other}`: expected a list or a string"),
            )),
        }
    }

    fn matches(&self, key: &str) -> bool {
        match self {
            Modules::Regex(re) => re.is_match(key).unwrap_or(false),
            Modules::List(names) => {
                names.iter().any(|n| key == n || key.ends_with(&format!(".{n}")))
            }
        }
    }
}

/// A PEFT LoRA adapter's settings, read so that whet computes what PEFT computes, or refuses.
#[derive(Debug)]
pub struct PeftAdapter {
    /// `adapter_config.json`, for messages.
    pub path: std::path::PathBuf,
    /// Default rank `r`.
    pub r: usize,
    /// Default `lora_alpha`.
    pub lora_alpha: f64,
    /// rsLoRA scaling (`alpha / sqrt(r)`).
    pub use_rslora: bool,
    /// The base model it was trained on, when recorded.
    pub base_model: Option<String>,
    targets: Modules,
    exclude: Option<Modules>,
    /// `rank_pattern` and `alpha_pattern`, in file order.
    rank_pattern: Vec<(fancy_regex::Regex, usize)>,
    alpha_pattern: Vec<(fancy_regex::Regex, f64)>,
    layers_to_transform: Option<Vec<usize>>,
    layers_pattern: Vec<String>,
}

/// Fields that change what the adapter computes and that whet does not implement, with the
/// value that is harmless.
const REFUSED: [(&str, &str); 15] = [
    ("use_dora", "false"),
    ("modules_to_save", "null"),
    ("lora_bias", "false"),
    ("bias", "\"none\""),
    ("target_parameters", "null"),
    ("trainable_token_indices", "null"),
    ("alora_invocation_tokens", "null"),
    ("layer_replication", "null"),
    ("fan_in_fan_out", "false"),
    ("use_qalora", "false"),
    ("arrow_config", "null"),
    ("use_bdlora", "null"),
    ("kasa_config", "null"),
    ("velora_config", "null"),
    ("monteclora_config", "null"),
];

/// Fields that do not change what a trained adapter computes (initialisation, bookkeeping) or
/// that whet implements.
const UNDERSTOOD: [&str; 26] = [
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "lora_dropout",
    "init_lora_weights",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "ensure_weight_tying",
];

impl PeftAdapter {
    /// Read `DIR/adapter_config.json`. A field that would change the computation and that
    /// whet does not implement is an error naming it; fields whet does not know are listed in
    /// a warning.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let text = read_text(&path)?;
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| Error::config(&path, format!("invalid adapter config: {e}")))?;
        let bad = |msg: String| Error::config(&path, msg);
        let null = serde_json::Value::Null;
        let get = |k: &str| v.get(k).unwrap_or(&null);
        match get("peft_type").as_str() {
            Some("LORA") => {}
            other => {
                return Err(bad(format!(
                    "`peft_type` = `{}`; whet reads LORA adapters",
                    other.unwrap_or("(absent)")
                )))
            }
        }
        for (field, harmless) in REFUSED {
            let value = get(field);
            if is_set(field, value) {
                return Err(bad(format!(
                    "`{field}` = `{value}` changes what the adapter computes and whet does not implement it (only `{harmless}`)"
                )));
            }
        }
        let unknown: Vec<&str> = v
            .keys()
            .map(String::as_str)
            .filter(|k| !UNDERSTOOD.contains(k) && !REFUSED.iter().any(|(f, _)| f == k))
            .collect();
        if !unknown.is_empty() {
            tracing::warn!(
                "{}: fields whet does not know, ignored: {}",
                path.display(),
                unknown.join(", ")
            );
        }
        let r = get("r")
            .as_u64()
            .ok_or_else(|| bad(format!("`r` = `{}`: expected a positive integer", get("r"))))?
            as usize;
        if r == 0 {
            return Err(bad("`r` (rank) must be at least 1, got `0`".into()));
        }
        let lora_alpha = match get("lora_alpha") {
            serde_json::Value::Null => r as f64, // PEFT's default is 8; files always carry it
            x => {
                x.as_f64().ok_or_else(|| bad(format!("`lora_alpha` = `{x}`: expected a number")))?
            }
        };
        let targets = Modules::parse(get("target_modules"), "target_modules", &path)?
            .ok_or_else(|| bad("`target_modules` is missing".into()))?;
        let exclude = Modules::parse(get("exclude_modules"), "exclude_modules", &path)?;
        let pattern = |field: &str| -> Result<Vec<(fancy_regex::Regex, f64)>> {
            let Some(map) = get(field).as_object() else { return Ok(vec![]) };
            map.iter()
                .map(|(k, x)| {
                    // PEFT's get_pattern_key: re.match(rf"(.*\.)?({key})$", module)
                    let re = fancy_regex::Regex::new(&format!("^(.*\\.)?({k})$"))
                        .map_err(|e| bad(format!("`{field}` key `{k}`: {e}")))?;
                    let value = x.as_f64().ok_or_else(|| {
                        bad(format!("`{field}`.`{k}` = `{x}`: expected a number"))
                    })?;
                    Ok((re, value))
                })
                .collect()
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(re, v)| {
                if v >= 1.0 && v.fract() == 0.0 {
                    Ok((re, v as usize))
                } else {
                    Err(bad(format!("`rank_pattern` value `{v}` must be a positive integer")))
                }
            })
            .collect::<Result<_>>()?;
        let alpha_pattern = pattern("alpha_pattern")?;
        let layers_to_transform = match get("layers_to_transform") {
            serde_json::Value::Null => None,
            serde_json::Value::Number(n) => Some(vec![n.as_u64().unwrap_or(u64::MAX) as usize]),
            serde_json::Value::Array(a) => Some(
                a.iter()
                    .map(|x| {
                        x.as_u64().map(|n| n as usize).ok_or_else(|| {
                            bad(format!(
                                "`layers_to_transform` entry `{x}`: expected a layer index"
                            ))
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            x => {
                return Err(bad(format!(
                    "`layers_to_transform` = `{x}`: expected an index or a list"
                )))
            }
        };
        let layers_pattern = match get("layers_pattern") {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) => {
                a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()
            }
            _ => vec![],
        };
        Ok(Self {
            r,
            lora_alpha,
            use_rslora: get("use_rslora").as_bool().unwrap_or(false),
            base_model: get("base_model_name_or_path").as_str().map(str::to_string),
            targets,
            exclude,
            rank_pattern,
            alpha_pattern,
            layers_to_transform: layers_to_transform.filter(|l| !l.is_empty()),
            layers_pattern,
            path,
        })
    }

    /// Whether the adapter wraps the module at `key` (`model.layers.0.self_attn.q_proj`), as
    /// PEFT's `check_target_module_exists` and `_check_exclude_modules` decide.
    pub fn targets(&self, key: &str) -> bool {
        if self.exclude.as_ref().is_some_and(|e| e.matches(key)) {
            return false;
        }
        if !self.targets.matches(key) {
            return false;
        }
        // Layer indices restrict list targets only, and not exact names.
        let (Modules::List(names), Some(layers)) = (&self.targets, &self.layers_to_transform)
        else {
            return true;
        };
        if names.iter().any(|n| n == key) {
            return true;
        }
        let index = if self.layers_pattern.is_empty() {
            layer_index(key, r"[^.]*")
        } else {
            self.layers_pattern.iter().find_map(|p| layer_index(key, &fancy_regex::escape(p)))
        };
        index.is_some_and(|i| layers.contains(&i))
    }

    /// The rank and alpha of the module at `key`: the first matching `rank_pattern` /
    /// `alpha_pattern` key, else `r` and `lora_alpha`.
    pub fn rank_alpha(&self, key: &str) -> (usize, f64) {
        let rank = self.rank_pattern.iter().find(|(re, _)| re.is_match(key).unwrap_or(false));
        let alpha = self.alpha_pattern.iter().find(|(re, _)| re.is_match(key).unwrap_or(false));
        (rank.map_or(self.r, |(_, r)| *r), alpha.map_or(self.lora_alpha, |(_, a)| *a))
    }

    /// `target_modules` as written: the names, or `regex` and the expression.
    pub fn describe_targets(&self) -> String {
        match &self.targets {
            Modules::List(names) => names.join(", "),
            Modules::Regex(re) => {
                format!("regex `{}`", re.as_str().trim_start_matches("^(?:").trim_end_matches(")$"))
            }
        }
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self, key: &str) -> f64 {
        let (r, alpha) = self.rank_alpha(key);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
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

/// The layer index in `key` after a `pattern` component (`model.layers.3.mlp` -> 3).
fn layer_index(key: &str, pattern: &str) -> Option<usize> {
    let re = fancy_regex::Regex::new(&format!(r"^.*\.{pattern}\.(\d+)\.")).ok()?;
    re.captures(key).ok()??.get(1)?.as_str().parse().ok()
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

fn attach(model: &mut Llama, dir: &Path, named: Option<(&str, f64)>) -> Result<PeftAdapter> {
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

/// Write the adapter in `dir` as a llama.cpp LoRA adapter GGUF (`general.type = adapter`,
/// `adapter.type = lora`, `adapter.lora.alpha`, tensors `blk.N.attn_q.weight.lora_a`/`.lora_b`,
/// q/k rows permuted as llama.cpp permutes its base weights) for a base model of `cfg`.
///
/// llama.cpp scales every tensor pair by one `alpha` over that pair's rank, so it would compute
/// rsLoRA and `rank_pattern`/`alpha_pattern` adapters wrongly (its own converter writes them
/// anyway); whet folds each module's true scale into its `B` instead, so the file computes what
/// PEFT computes. Returns the number of adapted modules.
pub fn adapter_to_gguf(dir: &Path, cfg: &crate::Config, out: &Path) -> Result<usize> {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let adapter = PeftAdapter::read(dir)?;
    let path = dir.join("adapter_model.safetensors");
    let tensors = read_tensors(dir)?;
    let arch = match cfg.arch {
        crate::Arch::Llama | crate::Arch::Mistral => "llama",
        other => other.name(),
    };
    let alpha = adapter.lora_alpha;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut out_tensors: Vec<(String, QTensor)> = vec![];
    for name in names {
        let Some(module) =
            name.strip_prefix("base_model.model.").and_then(|n| n.strip_suffix(".lora_A.weight"))
        else {
            if name.ends_with(".lora_B.weight") {
                continue; // taken with its A
            }
            return Err(io(
                &path,
                format!("tensor `{name}` is not a LoRA A or B matrix whet converts"),
            ));
        };
        let gguf = crate::io::gguf::gguf_module_name(module).ok_or_else(|| {
            io(
                &path,
                format!("tensor `{name}`: llama.cpp adapters have no place for module `{module}`"),
            )
        })?;
        let b_name = format!("base_model.model.{module}.lora_B.weight");
        let (a, b) = (
            &tensors[name],
            tensors.get(&b_name).ok_or_else(|| io(&path, format!("missing tensor `{b_name}`")))?,
        );
        let r = a.dim(0)?;
        if adapter.rank_alpha(module).0 != r || b.dims().get(1) != Some(&r) {
            return Err(io(
                &path,
                format!(
                    "tensor `{name}` has rank {r}, adapter_config.json says {} (B is {:?})",
                    adapter.rank_alpha(module).0,
                    b.dims()
                ),
            ));
        }
        // llama.cpp multiplies by alpha / r (by 1 when alpha is 0): fold in the difference.
        let theirs = if alpha == 0.0 { 1.0 } else { alpha / r as f64 };
        let factor = adapter.scale(module) / theirs;
        let mut b = b.to_dtype(DType::F32)?;
        if factor != 1.0 {
            b = (b * factor)?;
        }
        if arch == "llama" {
            if module.ends_with("self_attn.q_proj") {
                b = crate::io::gguf::permute(&b, cfg.num_heads)?;
            } else if module.ends_with("self_attn.k_proj") {
                b = crate::io::gguf::permute(&b, cfg.num_kv_heads)?;
            }
        }
        let a = a.to_dtype(DType::F32)?;
        out_tensors.push((format!("{gguf}.weight.lora_a"), QTensor::quantize(&a, GgmlDType::F32)?));
        out_tensors.push((format!("{gguf}.weight.lora_b"), QTensor::quantize(&b, GgmlDType::F32)?));
    }
    let metadata = [
        ("general.architecture", gguf_file::Value::String(arch.into())),
        ("general.type", gguf_file::Value::String("adapter".into())),
        ("adapter.type", gguf_file::Value::String("lora".into())),
        ("adapter.lora.alpha", gguf_file::Value::F32(alpha as f32)),
    ];
    let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = out_tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    // Written beside `out`, then renamed: a failure leaves no half-written file.
    let tmp = out.with_extension("gguf.tmp");
    let result = std::fs::File::create(&tmp)
        .map_err(|e| io(&tmp, e))
        .and_then(|mut f| gguf_file::write(&mut f, &md, &ts).map_err(|e| io(&tmp, e)))
        .and_then(|_| std::fs::rename(&tmp, out).map_err(|e| io(out, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|_| out_tensors.len() / 2)
}

/// What another runtime does with an adapter, for `whet adapter check`.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    /// The runtime refuses to load it.
    Rejects(String),
    /// The runtime loads it and computes something else, without a word.
    Miscomputes(String),
}

/// The runtimes [`check_for`] knows, with the source its rules were read from.
pub const RUNTIMES: [(&str, &str); 5] = [
    ("whet", "this reader"),
    ("peft", "the format's reference: PEFT reads every field it writes"),
    ("vllm", "vLLM's `PEFTHelper` (one scaling `lora_alpha / r`, or `/ sqrt(r)` with rsLoRA; default `--max-lora-rank` 16)"),
    ("llama.cpp", "llama.cpp's `convert_lora_to_gguf.py` (one `lora_alpha`, over each tensor's rank)"),
    ("mistralrs", "mistral.rs `mistralrs-core/src/lora` (reads only `r`, `lora_alpha`, `lora_dropout` and `target_modules` as a list; scale `lora_alpha / r`; every targeted module of every layer must have tensors of rank `r`)"),
];

/// What `runtime` (a [`RUNTIMES`] name) will refuse or silently compute differently for the
/// adapter in `dir`; an empty list when it runs it as PEFT does.
pub fn check_for(dir: &Path, runtime: &str) -> Result<Vec<Finding>> {
    let path = dir.join("adapter_config.json");
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&read_text(&path)?)
        .map_err(|e| Error::config(&path, format!("invalid adapter config: {e}")))?;
    let set = |k: &str| v.get(k).is_some_and(|value| is_set(k, value));
    let mut out = vec![];
    // Every runtime reads the tensors: a truncated or non-finite file runs nowhere.
    if let Err(e) = read_tensors(dir) {
        out.push(Finding::Rejects(e.to_string()));
    }
    match runtime {
        "whet" => {
            if let Err(e) = PeftAdapter::read(dir) {
                out.push(Finding::Rejects(e.to_string()));
            }
        }
        "peft" => {}
        "vllm" => {
            for (k, why) in [("use_dora", "DoRA"), ("modules_to_save", "`modules_to_save`")] {
                if set(k) {
                    out.push(Finding::Rejects(format!("{why} (`{k}`)")));
                }
            }
            if set("bias") {
                out.push(Finding::Rejects(
                    "`bias` other than `none` (unless started with bias enabled)".into(),
                ));
            }
            let ranks = std::iter::once(v.get("r").and_then(|r| r.as_u64()).unwrap_or(0)).chain(
                v.get("rank_pattern")
                    .and_then(|p| p.as_object())
                    .into_iter()
                    .flat_map(|p| p.values().filter_map(|r| r.as_u64())),
            );
            if let Some(r) = ranks.max().filter(|&r| r > 16) {
                out.push(Finding::Rejects(format!("rank {r} is above the default `--max-lora-rank` 16 (start vLLM with `--max-lora-rank {r}` or more)")));
            }
            for k in ["rank_pattern", "alpha_pattern"] {
                if set(k) {
                    out.push(Finding::Miscomputes(format!(
                        "`{k}` is ignored: every module is scaled by the one `lora_alpha / r`"
                    )));
                }
            }
        }
        "llama.cpp" => {
            if set("use_dora") {
                out.push(Finding::Rejects(
                    "DoRA: its `lora_magnitude_vector` tensors are not LoRA A/B matrices".into(),
                ));
            }
            if set("modules_to_save") {
                out.push(Finding::Rejects(
                    "`modules_to_save`: fully trained modules are not LoRA A/B matrices".into(),
                ));
            }
            for (k, what) in
                [("use_rslora", "rsLoRA's `alpha / sqrt(r)`"), ("alpha_pattern", "`alpha_pattern`")]
            {
                if set(k) {
                    out.push(Finding::Miscomputes(format!(
                        "{what} is lost by convert_lora_to_gguf.py, which scales by `lora_alpha / r`; hint: `whet adapter convert --to gguf` folds the true scales in"
                    )));
                }
            }
        }
        "mistralrs" => {
            if v.get("target_modules").is_some_and(|t| t.is_string()) {
                out.push(Finding::Rejects(
                    "`target_modules` as a regular expression: mistral.rs reads a list of names"
                        .into(),
                ));
            }
            if set("rank_pattern") {
                out.push(Finding::Rejects(
                    "`rank_pattern`: mistral.rs expects every adapter tensor at rank `r`, so tensors of other ranks do not load".into(),
                ));
            }
            for k in ["layers_to_transform", "exclude_modules"] {
                if set(k) {
                    out.push(Finding::Rejects(format!(
                        "`{k}`: mistral.rs wraps the targeted modules of every layer and stops at the first without tensors"
                    )));
                }
            }
            let ignored = [
                ("use_rslora", "rsLoRA's `lora_alpha / sqrt(r)` becomes `lora_alpha / r`"),
                ("alpha_pattern", "`alpha_pattern` is ignored: every module gets `lora_alpha / r`"),
                ("use_dora", "DoRA's magnitude vectors are ignored: it runs as plain LoRA"),
                (
                    "modules_to_save",
                    "`modules_to_save` is ignored: the saved modules keep the base weights",
                ),
                ("bias", "trained biases (`bias` other than `none`) are ignored"),
                ("lora_bias", "`lora_bias` is ignored"),
            ];
            for (k, what) in ignored {
                if set(k) {
                    out.push(Finding::Miscomputes(what.into()));
                }
            }
        }
        other => {
            let names: Vec<&str> = RUNTIMES.iter().map(|(n, _)| *n).collect();
            return Err(Error::config(
                &path,
                format!("unknown runtime `{other}`; whet checks for {}", names.join(", ")),
            ));
        }
    }
    Ok(out)
}
