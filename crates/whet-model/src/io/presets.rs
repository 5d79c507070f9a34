//! Random presets (`random:tiny`, `random:smollm2-135m`, `random:qwen2.5-1.5b`): a configuration and seeded weights,
//! built through the same loader as real checkpoints. The loader asks a [`SimpleBackend`] for
//! each tensor by name with the initializer the layer declares (norms at one, linear weights
//! with Llama's std 0.02, ...); this backend draws it, so there is no second list of names.

use crate::config::{Arch, Config, RopeScaling};
use crate::error::{Error, Result};
use crate::io::tokenizer::ModelTokenizer;
use crate::io::LoadedModel;
use crate::models::llama::Llama;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The preset names `random:NAME` accepts.
pub const PRESETS: [&str; 3] = ["tiny", "smollm2-135m", "qwen2.5-1.5b"];

/// Configuration of a random preset.
pub fn preset(name: &str) -> Option<Config> {
    let smollm2 = Config {
        arch: Arch::Llama,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        vocab_size: 49152,
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        qkv_bias: false,
        o_bias: false,
        qk_norm: false,
        sliding_window: None,
        eos_token_ids: vec![],
        bos_token_id: None,
    };
    match name {
        "smollm2-135m" => Some(smollm2),
        // Qwen2.5-1.5B's shapes (its config.json), for memory and speed at the size people
        // fine-tune on one GPU.
        "qwen2.5-1.5b" => Some(Config {
            arch: Arch::Qwen2,
            hidden_size: 1536,
            intermediate_size: 8960,
            num_layers: 28,
            num_heads: 12,
            num_kv_heads: 2,
            head_dim: 128,
            vocab_size: 151_936,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 32_768,
            qkv_bias: true,
            ..smollm2.clone()
        }),
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

/// Draws every tensor the loader asks for from whet's seeded generator (candle's CPU RNG cannot
/// be seeded): one ChaCha stream per tensor name, so values do not depend on load order.
/// Normal initializers are drawn uniform with the same standard deviation. Keeps what it drew.
struct RandomBackend {
    seed: u64,
    /// What it drew, when asked to keep it.
    drawn: Option<Arc<Mutex<HashMap<String, Tensor>>>>,
}

impl SimpleBackend for RandomBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        let salt = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3) // FNV-1a
        });
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ salt);
        let data: Vec<f32> = match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => {
                let b = (stdev * 3f64.sqrt()) as f32; // uniform(-b, b) has std b / sqrt(3)
                (0..n).map(|_| mean as f32 + rng.random_range(-b..b)).collect()
            }
            Init::Uniform { lo, up } => {
                (0..n).map(|_| rng.random_range(lo as f32..up as f32)).collect()
            }
            Init::Kaiming { .. } => {
                candle_core::bail!("random preset: no initializer for `{name}`")
            }
        };
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?;
        if let Some(drawn) = &self.drawn {
            crate::ops::lock(drawn)?.insert(name.to_string(), t.clone());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random preset: `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// The model of `cfg` with seeded random weights, and the weights under their Hugging Face
/// names.
fn build(
    cfg: &Config,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<(Llama, HashMap<String, Tensor>)> {
    let drawn = Arc::new(Mutex::new(HashMap::new()));
    let backend = RandomBackend { seed, drawn: Some(drawn.clone()) };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let model = Llama::load(vb, cfg)?;
    let drawn = std::mem::take(&mut *crate::ops::lock(&drawn)?);
    Ok((model, drawn))
}

/// Random weights for `cfg` under their Hugging Face names, reproducible from `seed` on any
/// device: what the loader draws for a random preset (see [`RandomBackend`]).
pub fn random_weights(
    cfg: &Config,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    Ok(build(cfg, dtype, device, seed)?.1)
}

pub(crate) fn load_random(
    name: &str,
    dtype: DType,
    device: &Device,
    seed: u64,
    quantize: Option<candle_core::quantized::GgmlDType>,
) -> Result<LoadedModel> {
    let config = preset(name).ok_or_else(|| Error::Source {
        spec: format!("random:{name}"),
        msg: "unknown preset".into(),
    })?;
    // Nothing kept beside the model, so a quantized block's f32 draws are freed as it is built.
    let backend = RandomBackend { seed, drawn: None };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let model = Llama::load_quantized(vb, &config, quantize)?;
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
        let norm = a["model.layers.0.input_layernorm.weight"].to_vec1::<f32>().unwrap();
        assert!(norm.iter().all(|&x| x == 1.0), "norms start at one");
    }
}
