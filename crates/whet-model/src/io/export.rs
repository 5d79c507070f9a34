//! Writing a model as a Hugging Face directory (`config.json`, safetensors, tokenizer files),
//! the layout every other tool reads.

use crate::config::{Config, RopeScaling};
use crate::error::{Error, Result};
use crate::io::tokenizer::ModelTokenizer;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// `config.json` for `cfg`, with transformers' field names.
pub fn config_json(cfg: &Config) -> serde_json::Value {
    let arch = cfg.arch.name();
    let class = cfg.arch.class();
    let rope_scaling = match &cfg.rope_scaling {
        RopeScaling::None => serde_json::Value::Null,
        // Per-frequency factors have no config.json form; save_hf_dir refuses them.
        RopeScaling::Factors(_) => serde_json::Value::Null,
        RopeScaling::Linear { factor } => {
            serde_json::json!({"rope_type": "linear", "factor": factor})
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            serde_json::json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings})
        }
    };
    serde_json::json!({
        "architectures": [class],
        "model_type": arch,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.o_bias || (cfg.qkv_bias && cfg.arch != crate::config::Arch::Qwen2),
        "sliding_window": cfg.sliding_window,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids,
        "torch_dtype": "float32",
    })
}

/// Write `tensors` (Hugging Face names) as a model directory `dir`, split into `shards` files
/// with an index when `shards > 1`.
pub fn save_hf_dir(
    dir: &Path,
    cfg: &Config,
    tensors: &HashMap<String, Tensor>,
    tokenizer: &ModelTokenizer,
    shards: usize,
) -> Result<()> {
    if let RopeScaling::Factors(_) = cfg.rope_scaling {
        return Err(Error::config(
            dir,
            "RoPE frequency factors (GGUF `rope_freqs.weight`) have no config.json form; hint: export from the model's Hugging Face directory",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::corrupt(dir, e))?;
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).map_err(|e| Error::corrupt(dir.join(name), e))
    };
    write("config.json", serde_json::to_string_pretty(&config_json(cfg)).unwrap_or_default())?;
    tokenizer
        .tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| Error::tokenizer(dir.join("tokenizer.json"), e))?;
    let tok_cfg = serde_json::json!({
        "chat_template": tokenizer.chat_template,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
    });
    write("tokenizer_config.json", serde_json::to_string_pretty(&tok_cfg).unwrap_or_default())?;
    let generation = serde_json::json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": tokenizer.stop_ids,
        "do_sample": false,
    });
    write("generation_config.json", serde_json::to_string_pretty(&generation).unwrap_or_default())?;
    if shards <= 1 {
        let path = dir.join("model.safetensors");
        return candle_core::safetensors::save(tensors, &path).map_err(|e| Error::corrupt(path, e));
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(shards)).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        let part: HashMap<String, Tensor> =
            chunk.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        candle_core::safetensors::save(&part, dir.join(&file))
            .map_err(|e| Error::corrupt(dir.join(&file), e))?;
        for n in chunk {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    write("model.safetensors.index.json", index.to_string())
}
