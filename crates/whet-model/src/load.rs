//! Turning a `--model` value into a loaded model: a GGUF file, a Hugging Face model directory,
//! a hub id (through hf-hub's cache), or a random preset.

use crate::config::{Config, ConfigFile};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::llama::Llama;
use crate::tokenizer::ModelTokenizer;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
    match source {
        ModelSource::Gguf(path) => load_gguf(path, dtype, device),
        ModelSource::HfDir(dir) => load_hf_dir(dir, dtype, device),
        ModelSource::Hub(id) => load_hf_dir(&resolve_hub(id)?, dtype, device),
        ModelSource::Random(name) => load_random(name, dtype, device, seed),
    }
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

/// A GGUF file's header, validated configuration and tokenizer (checked against each other).
fn open_gguf(path: &Path) -> Result<(GgufFile, Config, ModelTokenizer)> {
    let gguf = GgufFile::open(path)?;
    let config = gguf.config_file()?.into_config(path)?;
    let tokenizer = ModelTokenizer::from_gguf(&gguf)?;
    tokenizer.check_fits(config.vocab_size, path)?;
    Ok((gguf, config, tokenizer))
}

fn tokenizer_from_dir(dir: &Path, config: &Config) -> Result<ModelTokenizer> {
    let tokenizer = ModelTokenizer::from_dir(dir, &config.eos_token_ids)?;
    tokenizer.check_fits(config.vocab_size, &dir.join("tokenizer.json"))?;
    Ok(tokenizer)
}

fn read_config(dir: &Path) -> Result<Config> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound { path: config_path.clone() },
        _ => Error::corrupt(&config_path, e),
    })?;
    let file: ConfigFile = serde_json::from_str(&text)
        .map_err(|e| Error::config(&config_path, format!("invalid model config: {e}")))?;
    file.into_config(&config_path)
}

fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let (gguf, config, tokenizer) = open_gguf(path)?;
    let mut tensors = gguf.tensors(config.num_heads, config.num_kv_heads, dtype, device)?;
    // Some converters store a tied head anyway; the embedding is the one used.
    if config.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    let types: std::collections::BTreeSet<String> =
        gguf.content.tensor_infos.values().map(|t| format!("{:?}", t.ggml_dtype)).collect();
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let model = Llama::load(vb, &config).map_err(|e| Error::corrupt(path, e))?;
    let types: Vec<String> = types.into_iter().collect();
    let source = format!("{} (GGUF {}, dequantized to {dtype:?})", path.display(), types.join("/"));
    Ok(LoadedModel { model, config, tokenizer, source })
}

fn load_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
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
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
        .map_err(|e| Error::corrupt(dir, e))?;
    let model = Llama::load(vb, &config).map_err(|e| Error::corrupt(dir, e))?;
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

const PRESETS: [&str; 2] = ["tiny", "smollm2-135m"];

/// Configuration of a random preset.
pub fn preset(name: &str) -> Option<Config> {
    let smollm2 = Config {
        arch: crate::config::Arch::Llama,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        vocab_size: 49152,
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        rope_scaling: crate::config::RopeScaling::None,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        qkv_bias: false,
        o_bias: false,
        eos_token_ids: vec![],
        bos_token_id: None,
    };
    match name {
        "smollm2-135m" => Some(smollm2),
        // Small enough for unit tests, but with GQA and an untied head to exercise both paths.
        "tiny" => Some(Config {
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            vocab_size: 320,
            max_position_embeddings: 512,
            tie_word_embeddings: false,
            ..smollm2
        }),
        _ => None,
    }
}

/// Random weights for `cfg`, reproducible from `seed` on any device (candle's CPU RNG cannot be
/// seeded, so values come from whet's own ChaCha generator): linear weights uniform with the
/// standard deviation 0.02 that Llama's initializer uses (embedding and head wider, see
/// below), norms at one.
pub fn random_weights(
    cfg: &Config,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let bound = 0.02 * 3f32.sqrt(); // uniform(-b, b) has std b / sqrt(3)
    let mut shapes: Vec<(String, Vec<usize>, bool)> = vec![
        ("model.embed_tokens.weight".into(), vec![cfg.vocab_size, cfg.hidden_size], false),
        ("model.norm.weight".into(), vec![cfg.hidden_size], true),
    ];
    if !cfg.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![cfg.vocab_size, cfg.hidden_size], false));
    }
    let (c, h, k, d, m) =
        (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size);
    for i in 0..cfg.num_layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        shapes.extend([
            (p("input_layernorm.weight"), vec![c], true),
            (p("post_attention_layernorm.weight"), vec![c], true),
            (p("self_attn.q_proj.weight"), vec![h * d, c], false),
            (p("self_attn.k_proj.weight"), vec![k * d, c], false),
            (p("self_attn.v_proj.weight"), vec![k * d, c], false),
            (p("self_attn.o_proj.weight"), vec![c, h * d], false),
            (p("mlp.gate_proj.weight"), vec![m, c], false),
            (p("mlp.up_proj.weight"), vec![m, c], false),
            (p("mlp.down_proj.weight"), vec![c, m], false),
        ]);
        if cfg.qkv_bias {
            shapes.extend([
                (p("self_attn.q_proj.bias"), vec![h * d], false),
                (p("self_attn.k_proj.bias"), vec![k * d], false),
                (p("self_attn.v_proj.bias"), vec![k * d], false),
            ]);
        }
        if cfg.o_bias {
            shapes.push((p("self_attn.o_proj.bias"), vec![c], false));
        }
    }
    // Embedding and head rows get std 2/sqrt(C) rather than 0.02: with RMS-normalised hidden
    // states, 0.02 caps every logit near 0.02 * C, and a random model could then never become
    // confident — not even the overfit test could drive its loss down.
    let wide = 2.0 / (cfg.hidden_size as f32).sqrt() * 3f32.sqrt();
    let mut out = HashMap::new();
    for (name, shape, ones) in shapes {
        let n: usize = shape.iter().product();
        let b =
            if name.contains("embed_tokens") || name.starts_with("lm_head") { wide } else { bound };
        let data: Vec<f32> =
            if ones { vec![1.0; n] } else { (0..n).map(|_| rng.random_range(-b..b)).collect() };
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?;
        out.insert(name, t);
    }
    Ok(out)
}

fn load_random(name: &str, dtype: DType, device: &Device, seed: u64) -> Result<LoadedModel> {
    let config = preset(name).ok_or_else(|| Error::Source {
        spec: format!("random:{name}"),
        msg: "unknown preset".into(),
    })?;
    let tensors = random_weights(&config, dtype, device, seed)?;
    let model = Llama::load(VarBuilder::from_tensors(tensors, dtype, device), &config)?;
    let tokenizer = ModelTokenizer::byte_level()?;
    Ok(LoadedModel {
        model,
        config,
        tokenizer,
        source: format!("random:{name} (seed {seed}, {dtype:?})"),
    })
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

    #[test]
    fn random_presets_are_reproducible_from_the_seed() {
        let cfg = preset("tiny").unwrap();
        let a = random_weights(&cfg, DType::F32, &Device::Cpu, 7).unwrap();
        let b = random_weights(&cfg, DType::F32, &Device::Cpu, 7).unwrap();
        let c = random_weights(&cfg, DType::F32, &Device::Cpu, 8).unwrap();
        let key = "model.layers.1.mlp.up_proj.weight";
        let v =
            |m: &HashMap<String, Tensor>| m[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&a), v(&b));
        assert_ne!(v(&a), v(&c));
        let n: usize = a.values().map(|t| t.elem_count()).sum();
        assert_eq!(n, cfg.num_parameters());
    }
}
