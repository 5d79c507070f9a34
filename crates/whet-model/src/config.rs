//! Model configuration in two stages: [`ConfigFile`] carries Hugging Face's `config.json` names
//! (and is also filled from GGUF metadata); [`ConfigFile::into_config`] validates it once into the
//! [`Config`] the model runs with.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The families whet's one Llama implementation covers; each is a configuration difference
/// (see [`Config`]) plus the layers that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 1-3.x, TinyLlama, SmolLM: dense, no attention biases.
    Llama,
    /// Mistral: Llama with sliding-window attention (`sliding_window`).
    Mistral,
    /// Qwen2/2.5: Llama with biases on the q/k/v projections.
    Qwen2,
    /// Qwen3: Llama with a per-head RMSNorm on queries and keys (`q_norm`, `k_norm`).
    Qwen3,
}

impl Arch {
    /// The name used by `config.json`'s `model_type` and GGUF's `general.architecture`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }

    /// transformers' class for the family (`config.json`'s `architectures`).
    pub fn class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// Every architecture, in the order error messages list them.
    pub const ALL: [Arch; 4] = [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Qwen3];

    /// Parse an architecture name, or say which ones whet supports.
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        Self::from_name(name).ok_or_else(|| {
            let names: Vec<String> = Self::ALL.iter().map(|a| format!("`{}`", a.name())).collect();
            format!("unsupported architecture `{name}`; whet supports {}", names.join(", "))
        })
    }

    /// Parse an architecture name; `None` when whet does not support it.
    pub fn from_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        Self::ALL.into_iter().find(|a| lower == a.name() || lower == a.class().to_ascii_lowercase())
    }
}

/// RoPE frequency scaling (`rope_scaling` in `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (`"type": "linear"`).
    Linear {
        /// Position interpolation factor.
        factor: f64,
    },
    /// Per-frequency divisors (GGUF `rope_freqs.weight`, `D/2` of them).
    Factors(Vec<f64>),
    /// Llama 3.1's frequency-dependent scaling (`"rope_type": "llama3"`).
    Llama3 {
        /// Overall scaling factor.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled fully.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are left alone.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
}

/// `rope_scaling` / `rope_parameters` as they appear in `config.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeScalingFile {
    /// `type` (older files) or `rope_type`.
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    /// Scaling factor.
    pub factor: Option<f64>,
    /// Llama 3 low-frequency factor.
    pub low_freq_factor: Option<f64>,
    /// Llama 3 high-frequency factor.
    pub high_freq_factor: Option<f64>,
    /// Llama 3 original context length.
    pub original_max_position_embeddings: Option<usize>,
    /// transformers 5 puts the base here (`rope_parameters.rope_theta`).
    pub rope_theta: Option<f64>,
}

/// One id or a list of ids (`eos_token_id` may be either).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// All ids as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// A model configuration with Hugging Face's field names, as read from `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct ConfigFile {
    /// `model_type` (`llama`, `qwen2`).
    pub model_type: Option<String>,
    /// `architectures` (`["LlamaForCausalLM"]`).
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA); defaults to `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Head width; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Rows of the embedding matrix.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: Option<f64>,
    /// RoPE scaling, older name.
    pub rope_scaling: Option<RopeScalingFile>,
    /// RoPE parameters, transformers 5 name.
    pub rope_parameters: Option<RopeScalingFile>,
    /// Longest context the model supports.
    pub max_position_embeddings: Option<usize>,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether q/k/v/o carry biases (Llama); Qwen2 always has q/k/v biases.
    pub attention_bias: Option<bool>,
    /// Keys a token attends to, itself included (Mistral; Qwen2/3 only with
    /// `use_sliding_window`).
    pub sliding_window: Option<usize>,
    /// Qwen2/3: whether `sliding_window` applies.
    pub use_sliding_window: Option<bool>,
    /// Biases on the MLP's projections (Llama's `mlp_bias`): not implemented, refused.
    pub mlp_bias: Option<bool>,
    /// The MLP's activation; whet implements SwiGLU's `silu` only.
    pub hidden_act: Option<String>,
    /// Mixture-of-experts fields: whet runs dense models only, and refuses these by name.
    pub num_local_experts: Option<usize>,
    /// Qwen MoE's name for the same.
    pub num_experts: Option<usize>,
    /// From GGUF `rope_freqs.weight`: per-frequency divisors of the RoPE frequencies, which
    /// llama.cpp's converter writes for Llama 3.1+ instead of `rope_scaling`.
    #[serde(skip)]
    pub rope_freq_factors: Option<Vec<f64>>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<TokenIds>,
}

/// A validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Architecture.
    pub arch: Arch,
    /// Width of the residual stream (`C`).
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Number of query heads (`H`).
    pub num_heads: usize,
    /// Number of key/value heads; divides `num_heads`.
    pub num_kv_heads: usize,
    /// Head width (`D`), even.
    pub head_dim: usize,
    /// Rows of the embedding matrix (`V`).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v carry biases.
    pub qkv_bias: bool,
    /// Whether o_proj carries a bias.
    pub o_bias: bool,
    /// Per-head RMSNorm on queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Sliding-window attention: each token attends to at most this many keys, itself
    /// included (Mistral).
    pub sliding_window: Option<usize>,
    /// End-of-sequence ids from the config (the tokenizer may add more).
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id from the config.
    pub bos_token_id: Option<u32>,
}

impl ConfigFile {
    /// Validate into a [`Config`]; `path` names the file in errors.
    pub fn into_config(self, path: &Path) -> Result<Config> {
        let arch_name =
            self.model_type.clone().or_else(|| self.architectures.first().cloned()).ok_or_else(
                || Error::config(path, "neither `model_type` nor `architectures` is set"),
            )?;
        let arch = Arch::parse(&arch_name).map_err(|msg| Error::config(path, msg))?;
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::config(path, format!("`{name}` must be positive, got `0`")))
            } else {
                Ok(v)
            }
        };
        let hidden_size = positive("hidden_size", self.hidden_size)?;
        let num_heads = positive("num_attention_heads", self.num_attention_heads)?;
        let num_kv_heads =
            positive("num_key_value_heads", self.num_key_value_heads.unwrap_or(num_heads))?;
        positive("intermediate_size", self.intermediate_size)?;
        positive("num_hidden_layers", self.num_hidden_layers)?;
        positive("vocab_size", self.vocab_size)?;
        if num_heads % num_kv_heads != 0 {
            return Err(Error::config(
                path,
                format!("`num_attention_heads` = `{num_heads}` is not a multiple of `num_key_value_heads` = `{num_kv_heads}`"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(Error::config(
                    path,
                    format!("`hidden_size` = `{hidden_size}` is not divisible by `num_attention_heads` = `{num_heads}`"),
                ))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::config(
                path,
                format!("`head_dim` = `{head_dim}` must be even and positive for RoPE"),
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(Error::config(
                path,
                format!("`rms_norm_eps` = `{}` must be in (0, 1)", self.rms_norm_eps),
            ));
        }
        let params =
            self.rope_parameters.clone().or_else(|| self.rope_scaling.clone()).unwrap_or_default();
        let default_theta = match arch {
            Arch::Qwen2 | Arch::Qwen3 => 1_000_000.0,
            Arch::Llama | Arch::Mistral => 10_000.0,
        };
        let rope_theta = self.rope_theta.or(params.rope_theta).unwrap_or(default_theta);
        if !(rope_theta > 1.0) {
            return Err(Error::config(
                path,
                format!("`rope_theta` = `{rope_theta}` must be greater than 1"),
            ));
        }
        let mut rope_scaling = rope_scaling(&params, path)?;
        if let Some(factors) = self.rope_freq_factors {
            if factors.len() != head_dim / 2 {
                return Err(Error::config(
                    path,
                    format!(
                        "tensor `rope_freqs.weight` has {} values, RoPE with `head_dim` {head_dim} needs {}",
                        factors.len(),
                        head_dim / 2
                    ),
                ));
            }
            if factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                return Err(Error::config(
                    path,
                    "tensor `rope_freqs.weight` holds a non-positive value",
                ));
            }
            if rope_scaling != RopeScaling::None {
                return Err(Error::config(
                    path,
                    format!(
                        "both `rope_freqs.weight` and rope scaling `{:?}`; whet applies one",
                        rope_scaling
                    ),
                ));
            }
            rope_scaling = RopeScaling::Factors(factors);
        }
        if self.mlp_bias == Some(true) {
            return Err(Error::config(path, "`mlp_bias` = `true` is not supported"));
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(Error::config(
                path,
                format!("`hidden_act` = `{act}` is not supported; whet's MLP is SwiGLU (`silu`)"),
            ));
        }
        if let Some(n) = self.num_local_experts.or(self.num_experts).filter(|&n| n > 1) {
            return Err(Error::config(
                path,
                format!("a mixture-of-experts model ({n} experts); whet runs dense models only"),
            ));
        }
        let sliding_window = match arch {
            Arch::Llama | Arch::Mistral => self.sliding_window,
            Arch::Qwen2 | Arch::Qwen3 if self.use_sliding_window == Some(true) => {
                // Qwen's window covers only the layers from `max_window_layers` on.
                return Err(Error::config(
                    path,
                    "`use_sliding_window` = `true` (Qwen's per-layer window) is not supported",
                ));
            }
            _ => None,
        };
        if sliding_window == Some(0) {
            return Err(Error::config(path, "`sliding_window` must be positive, got `0`"));
        }
        let attention_bias = self.attention_bias.unwrap_or(false);
        Ok(Config {
            arch,
            hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            qk_norm: arch == Arch::Qwen3,
            sliding_window,
            eos_token_ids: self.eos_token_id.map(|e| e.to_vec()).unwrap_or_default(),
            bos_token_id: self.bos_token_id.and_then(|b| b.to_vec().first().copied()),
        })
    }
}

fn rope_scaling(p: &RopeScalingFile, path: &Path) -> Result<RopeScaling> {
    let factor = || {
        p.factor.filter(|f| *f > 0.0).ok_or_else(|| {
            Error::config(
                path,
                format!(
                    "rope scaling `{}` needs a positive `factor`",
                    p.rope_type.as_deref().unwrap_or("")
                ),
            )
        })
    };
    match p.rope_type.as_deref() {
        None | Some("default" | "none") => Ok(RopeScaling::None),
        Some("linear") => Ok(RopeScaling::Linear { factor: factor()? }),
        Some("llama3") => Ok(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: p.low_freq_factor.unwrap_or(1.0),
            high_freq_factor: p.high_freq_factor.unwrap_or(4.0),
            original_max_position_embeddings: p.original_max_position_embeddings.unwrap_or(8192),
        }),
        Some(other) => Err(Error::config(
            path,
            format!("unsupported rope scaling type `{other}`; whet supports `linear` and `llama3`"),
        )),
    }
}

impl Config {
    /// Number of parameters (embedding counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (c, h, kv, d, m) = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
        );
        let attn = c * h * d
            + 2 * c * kv * d
            + h * d * c
            + if self.qkv_bias { h * d + 2 * kv * d } else { 0 }
            + if self.o_bias { c } else { 0 };
        let layer = attn + 3 * c * m + 2 * c + if self.qk_norm { 2 * d } else { 0 };
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * c };
        self.vocab_size * c + self.num_layers * layer + c + head
    }

    /// RoPE inverse frequencies (`D/2` of them) after scaling.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> =
            (0..d / 2).map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64)).collect();
        let scaled: Vec<f64> = match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            // llama.cpp divides each frequency by its factor (`ggml_rope_ext`'s `freq_factors`).
            RopeScaling::Factors(factors) => base.iter().zip(factors).map(|(f, k)| f / k).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                // Same piecewise rule as transformers' `_compute_llama3_parameters`.
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ConfigFile {
        serde_json::from_str(
            r#"{"model_type":"llama","hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,
                "num_attention_heads":9,"num_key_value_heads":3,"vocab_size":49152,"rms_norm_eps":1e-5,
                "rope_theta":100000.0,"tie_word_embeddings":true,"max_position_embeddings":8192}"#,
        )
        .unwrap()
    }

    #[test]
    fn smollm2_has_135m_parameters() {
        let cfg = smollm2().into_config(Path::new("config.json")).unwrap();
        assert_eq!(cfg.head_dim, 64);
        // The model card's count: 134,515,008 parameters.
        assert_eq!(cfg.num_parameters(), 134_515_008);
    }

    #[test]
    fn rejects_bad_values_naming_them() {
        let mut f = smollm2();
        f.num_key_value_heads = Some(4);
        let err = f.into_config(Path::new("m/config.json")).unwrap_err().to_string();
        assert_eq!(err, "m/config.json: `num_attention_heads` = `9` is not a multiple of `num_key_value_heads` = `4`");
        let mut f = smollm2();
        f.model_type = Some("gpt_neox".into());
        let err = f.into_config(Path::new("config.json")).unwrap_err().to_string();
        assert!(err.contains("unsupported architecture `gpt_neox`"), "{err}");
    }

    /// Settings that change the outputs and that whet does not implement are refused by name.
    #[test]
    fn refuses_what_it_does_not_implement() {
        let err = |edit: &dyn Fn(&mut ConfigFile)| {
            let mut f = smollm2();
            edit(&mut f);
            f.into_config(Path::new("c.json")).unwrap_err().to_string()
        };
        assert_eq!(
            err(&|f| f.mlp_bias = Some(true)),
            "c.json: `mlp_bias` = `true` is not supported"
        );
        assert!(err(&|f| f.hidden_act = Some("gelu".into())).contains("`hidden_act` = `gelu`"));
        assert_eq!(
            err(&|f| f.num_local_experts = Some(8)),
            "c.json: a mixture-of-experts model (8 experts); whet runs dense models only"
        );
        let e = err(&|f| {
            f.model_type = Some("qwen2".into());
            f.use_sliding_window = Some(true);
            f.sliding_window = Some(4096);
        });
        assert!(e.contains("`use_sliding_window` = `true`"), "{e}");
        let e = err(&|f| f.model_type = Some("gemma".into()));
        assert_eq!(
            e,
            "c.json: unsupported architecture `gemma`; whet supports `llama`, `mistral`, `qwen2`, `qwen3`"
        );
        let e = err(&|f| {
            f.rope_scaling = Some(RopeScalingFile {
                rope_type: Some("yarn".into()),
                factor: Some(4.0),
                ..Default::default()
            })
        });
        assert!(e.contains("unsupported rope scaling type `yarn`"), "{e}");
        let e = err(&|f| f.rope_freq_factors = Some(vec![1.0; 5]));
        assert_eq!(
            e,
            "c.json: tensor `rope_freqs.weight` has 5 values, RoPE with `head_dim` 64 needs 32"
        );
    }

    #[test]
    fn reads_transformers5_rope_parameters() {
        let mut f = smollm2();
        f.rope_theta = None;
        f.rope_parameters = Some(RopeScalingFile {
            rope_theta: Some(5e5),
            rope_type: Some("default".into()),
            ..Default::default()
        });
        assert_eq!(f.into_config(Path::new("c")).unwrap().rope_theta, 5e5);
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_scales_low_ones() {
        let mut f = smollm2();
        f.rope_scaling = Some(RopeScalingFile {
            rope_type: Some("llama3".into()),
            factor: Some(8.0),
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(8192),
            rope_theta: None,
        });
        let cfg = f.into_config(Path::new("c")).unwrap();
        let plain = Config { rope_scaling: RopeScaling::None, ..cfg.clone() }.rope_inv_freq();
        let scaled = cfg.rope_inv_freq();
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12);
    }
}
