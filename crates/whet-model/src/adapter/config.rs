//! `adapter_config.json`: PEFT's adapter settings, written and read.

use super::{is_set, read_text};
use crate::error::{Error, Result};
use crate::lora::LoraConfig;
use serde::{Deserialize, Serialize};
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

/// The settings of an adapter with one rank and alpha for all its layers (see
/// [`PeftAdapter::uniform`]), by PEFT's names.
#[derive(Debug, Clone, PartialEq)]
pub struct UniformLora {
    /// The rank of every layer.
    pub r: usize,
    /// The alpha of every layer.
    pub lora_alpha: f64,
    /// Comma-separated module names, as `--targets` takes them.
    pub target_modules: String,
    /// rsLoRA scaling.
    pub use_rslora: bool,
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

/// `DIR/adapter_config.json`'s path and fields, as every reader of it starts: whet's own
/// ([`PeftAdapter::read`]) and the checks of what other runtimes would do.
pub(super) fn read_fields(
    dir: &Path,
) -> Result<(std::path::PathBuf, serde_json::Map<String, serde_json::Value>)> {
    let path = dir.join("adapter_config.json");
    let fields = serde_json::from_str(&read_text(&path)?)
        .map_err(|e| Error::config(&path, format!("invalid adapter config: {e}")))?;
    Ok((path, fields))
}

impl PeftAdapter {
    /// Read `DIR/adapter_config.json`. A field that would change the computation and that
    /// whet does not implement is an error naming it; fields whet does not know are listed in
    /// a warning.
    pub fn read(dir: &Path) -> Result<Self> {
        let (path, v) = read_fields(dir)?;
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

    /// The settings training on from this adapter takes (`--init-adapter`): one rank and
    /// alpha for every layer and targets named by module, as whet trains them; an adapter with
    /// per-layer ranks, layer subsets or a regular expression for its targets is refused by the
    /// field that makes it so.
    pub fn uniform(&self) -> Result<UniformLora> {
        let refuse = |field: &str, why: &str| {
            Err(Error::config(
                &self.path,
                format!("`{field}` {why}; whet trains on from adapters with one rank and alpha for every layer of the modules they name"),
            ))
        };
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return refuse("rank_pattern`/`alpha_pattern", "sets ranks per layer");
        }
        if self.layers_to_transform.is_some() {
            return refuse("layers_to_transform", "adapts only some layers");
        }
        if self.exclude.is_some() {
            return refuse("exclude_modules", "leaves some layers out");
        }
        let Modules::List(names) = &self.targets else {
            return refuse("target_modules", "is a regular expression");
        };
        if let Some(odd) = names.iter().find(|n| !crate::lora::TARGETS.contains(&n.as_str())) {
            return Err(Error::config(
                &self.path,
                format!(
                    "`target_modules` names `{odd}`; whet trains on from adapters of {}",
                    crate::lora::TARGETS.join(", ")
                ),
            ));
        }
        Ok(UniformLora {
            r: self.r,
            lora_alpha: self.lora_alpha,
            target_modules: names.join(","),
            use_rslora: self.use_rslora,
        })
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

/// The layer index in `key` after a `pattern` component (`model.layers.3.mlp` -> 3).
fn layer_index(key: &str, pattern: &str) -> Option<usize> {
    let re = fancy_regex::Regex::new(&format!(r"^.*\.{pattern}\.(\d+)\.")).ok()?;
    re.captures(key).ok()??.get(1)?.as_str().parse().ok()
}
