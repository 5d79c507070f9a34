//! `adapter_config.json`: PEFT's adapter settings, one typed struct ([`AdapterConfig`]) that
//! whet writes and that every reader starts from — whet's own ([`PeftAdapter::read`], which
//! honours every field that changes the computation or refuses it by name) and the checks of
//! what other runtimes would do (`super::compat`).

use super::{is_set, read_text};
use crate::error::{Error, Result};
use crate::lora::LoraConfig;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// `target_modules` and `exclude_modules` as PEFT writes them: module names (a module whose
/// path is one, or ends in `.` + one), or one string, a regular expression the whole path must
/// match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "expected a list of module names or a regular expression")]
pub enum ModuleSpec {
    /// A list of names.
    Names(Vec<String>),
    /// A regular expression.
    Pattern(String),
}

/// A field PEFT takes as one value or a list (`layers_to_transform`, `layers_pattern`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "expected one value or a list of them")]
pub enum OneOrList<T> {
    /// One value.
    One(T),
    /// Several.
    List(Vec<T>),
}

impl<T: Clone> OneOrList<T> {
    fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrList::One(x) => vec![x.clone()],
            OneOrList::List(v) => v.clone(),
        }
    }
}

/// `adapter_config.json`, by PEFT's field names. The fields that shape what the adapter
/// computes are typed (a wrong type is an error naming the field); the rest is kept as written
/// in `rest`: PEFT's bookkeeping ([`BOOKKEEPING`]), the fields whet refuses when set
/// ([`REFUSED`]), and any whet does not know (named in a warning).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// `LORA` (the only type whet reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peft_type: Option<String>,
    /// `CAUSAL_LM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    /// The base model the adapter was trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name_or_path: Option<String>,
    /// The base model's revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Default rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<usize>,
    /// Default scaling numerator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Dropout used in training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    /// rsLoRA scaling (`alpha / sqrt(r)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_rslora: Option<bool>,
    /// Wrapped modules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<ModuleSpec>,
    /// Modules left out although targeted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_modules: Option<ModuleSpec>,
    /// Per-module ranks: module-name patterns to ranks, the first match wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_pattern: Option<Map<String, Value>>,
    /// Per-module alphas, as `rank_pattern`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha_pattern: Option<Map<String, Value>>,
    /// Only these layer indices are adapted (with list targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<OneOrList<usize>>,
    /// The module path component the layer index follows (`layers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_pattern: Option<OneOrList<String>>,
    /// Saved adapters are for inference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_mode: Option<bool>,
    /// Every other field, as written.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl AdapterConfig {
    /// The PEFT description of `cfg`, as whet writes it.
    pub fn from_lora(cfg: &LoraConfig, base_model: &str) -> Self {
        // The refused fields at their harmless values, as PEFT writes them: readers that do
        // not default them see what whet computes.
        let rest = [
            ("bias", Value::from("none")),
            ("fan_in_fan_out", Value::from(false)),
            ("modules_to_save", Value::Null),
        ];
        Self {
            peft_type: Some("LORA".into()),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(base_model.to_string()),
            r: Some(cfg.rank),
            lora_alpha: Some(cfg.alpha),
            lora_dropout: Some(cfg.dropout),
            target_modules: Some(ModuleSpec::Names(cfg.targets.clone())),
            use_rslora: Some(cfg.rslora),
            inference_mode: Some(true),
            rest: rest.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            ..Self::default()
        }
    }

    /// Read `DIR/adapter_config.json`; a field of the wrong type is an error naming it.
    pub fn read(dir: &Path) -> Result<(std::path::PathBuf, Self)> {
        let path = dir.join("adapter_config.json");
        let text = read_text(&path)?;
        let cfg = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(&text))
            .map_err(|e| {
                let field = e.path().to_string();
                let what = e.into_inner();
                let msg = if field == "." {
                    format!("invalid adapter config: {what}")
                } else {
                    format!("invalid adapter config: `{field}`: {what}")
                };
                Error::config(&path, msg)
            })?;
        Ok((path, cfg))
    }

    /// Whether `field` holds anything but its no-op value (absent, null, false, an empty
    /// list or map, `bias` = `none`), whichever of the typed fields or `rest` holds it.
    pub fn is_set(&self, field: &str) -> bool {
        self.value(field).is_some_and(|v| is_set(field, &v))
    }

    /// `field` as written (typed fields as they serialize), if present.
    pub fn value(&self, field: &str) -> Option<Value> {
        if let Some(v) = self.rest.get(field) {
            return Some(v.clone());
        }
        // The typed fields, by the names they serialize under: one definition of each name.
        match serde_json::to_value(self) {
            Ok(Value::Object(all)) => all.get(field).cloned(),
            _ => None,
        }
    }
}

/// Which modules an adapter wraps, compiled from a [`ModuleSpec`].
#[derive(Debug)]
enum Modules {
    List(Vec<String>),
    Regex(fancy_regex::Regex),
}

impl Modules {
    fn compile(spec: &ModuleSpec, field: &str, path: &Path) -> Result<Self> {
        match spec {
            ModuleSpec::Names(names) => Ok(Modules::List(names.clone())),
            ModuleSpec::Pattern(re) => fancy_regex::Regex::new(&format!("^(?:{re})$"))
                .map(Modules::Regex)
                .map_err(|e| Error::config(path, format!("`{field}` = `{re}`: {e}"))),
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

/// Fields of `rest` that do not change what a trained adapter computes (initialisation,
/// bookkeeping).
const BOOKKEEPING: [&str; 11] = [
    "init_lora_weights",
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
        let (path, c) = AdapterConfig::read(dir)?;
        Self::from_config(path, &c)
    }

    /// The settings of `c`, read from `path`.
    pub fn from_config(path: std::path::PathBuf, c: &AdapterConfig) -> Result<Self> {
        let bad = |msg: String| Error::config(&path, msg);
        match c.peft_type.as_deref() {
            Some("LORA") => {}
            other => {
                return Err(bad(format!(
                    "`peft_type` = `{}`; whet reads LORA adapters",
                    other.unwrap_or("(absent)")
                )))
            }
        }
        for (field, harmless) in REFUSED {
            if let Some(value) = c.value(field).filter(|v| is_set(field, v)) {
                return Err(bad(format!(
                    "`{field}` = `{value}` changes what the adapter computes and whet does not implement it (only `{harmless}`)"
                )));
            }
        }
        let unknown: Vec<&str> = c
            .rest
            .keys()
            .map(String::as_str)
            .filter(|k| !BOOKKEEPING.contains(k) && !REFUSED.iter().any(|(f, _)| f == k))
            .collect();
        if !unknown.is_empty() {
            tracing::warn!(
                "{}: fields whet does not know, ignored: {}",
                path.display(),
                unknown.join(", ")
            );
        }
        let r = c.r.ok_or_else(|| bad("`r` is missing: expected a positive integer".into()))?;
        if r == 0 {
            return Err(bad("`r` (rank) must be at least 1, got `0`".into()));
        }
        // PEFT's default is 8; files always carry it.
        let lora_alpha = c.lora_alpha.unwrap_or(r as f64);
        let targets = c
            .target_modules
            .as_ref()
            .ok_or_else(|| bad("`target_modules` is missing".into()))
            .and_then(|t| Modules::compile(t, "target_modules", &path))?;
        let exclude = c
            .exclude_modules
            .as_ref()
            .map(|e| Modules::compile(e, "exclude_modules", &path))
            .transpose()?;
        let pattern = |field: &str, map: &Option<Map<String, Value>>| {
            let Some(map) = map else { return Ok(vec![]) };
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
                .collect::<Result<Vec<_>>>()
        };
        let rank_pattern = pattern("rank_pattern", &c.rank_pattern)?
            .into_iter()
            .map(|(re, v)| {
                if v >= 1.0 && v.fract() == 0.0 {
                    Ok((re, v as usize))
                } else {
                    Err(bad(format!("`rank_pattern` value `{v}` must be a positive integer")))
                }
            })
            .collect::<Result<_>>()?;
        let alpha_pattern = pattern("alpha_pattern", &c.alpha_pattern)?;
        Ok(Self {
            r,
            lora_alpha,
            use_rslora: c.use_rslora.unwrap_or(false),
            base_model: c.base_model_name_or_path.clone(),
            targets,
            exclude,
            rank_pattern,
            alpha_pattern,
            layers_to_transform: c
                .layers_to_transform
                .as_ref()
                .map(OneOrList::to_vec)
                .filter(|l| !l.is_empty()),
            layers_pattern: c.layers_pattern.as_ref().map(OneOrList::to_vec).unwrap_or_default(),
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
