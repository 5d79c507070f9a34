//! Writing a model out: as a Hugging Face directory (`config.json`, safetensors, tokenizer
//! files), the layout every other tool reads, or as a GGUF file for llama.cpp.

use crate::config::{Config, RopeScaling};
use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;
use crate::io::tokenizer::ModelTokenizer;
use candle_core::quantized::{GgmlDType, QTensor};
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
        return save_safetensors(tensors, &path);
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(shards)).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        let part: HashMap<String, Tensor> =
            chunk.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        save_safetensors(&part, &dir.join(&file))?;
        for n in chunk {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    write("model.safetensors.index.json", index.to_string())
}

/// candle's safetensors writer, with the file's mode then set as the user's umask gives it (the
/// writer makes 0600 files; a model is copied and served by other users and processes).
fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let mode = std::fs::File::create(path)
        .and_then(|f| f.metadata())
        .map(|m| m.permissions())
        .map_err(|e| Error::corrupt(path, e))?;
    candle_core::safetensors::save(tensors, path).map_err(|e| Error::corrupt(path, e))?;
    std::fs::set_permissions(path, mode).map_err(|e| Error::corrupt(path, e))
}

/// Write `tensors` (Hugging Face names, e.g. from [`crate::Llama::named_weights`]) as a GGUF file
/// for llama.cpp, keeping the metadata of `src` — hyper-parameters, tokenizer, chat template —
/// and its tensors whet computes nothing from (`rope_freqs.weight`). q/k rows are permuted back
/// to llama.cpp's layout for `llama` files. Matrices whose rows fit `quant`'s blocks are stored
/// in it; norms, biases and the rest stay f32, as llama.cpp's quantizer keeps them.
pub fn save_gguf(
    src: &GgufFile,
    cfg: &Config,
    tensors: &[(String, Tensor)],
    quant: GgmlDType,
    out: &Path,
) -> Result<()> {
    use candle_core::quantized::gguf_file::Value;
    use candle_core::{DType, Device};
    let permuted = src.architecture()? == "llama";
    let mut written: Vec<(String, QTensor)> = vec![];
    for (hf, t) in tensors {
        let name = crate::io::gguf::gguf_name(hf)
            .ok_or_else(|| Error::config(out, format!("tensor `{hf}` has no GGUF name")))?;
        let mut t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        if permuted && (hf.contains("self_attn.q_proj.") || hf.contains("self_attn.k_proj.")) {
            let heads = if hf.contains("q_proj") { cfg.num_heads } else { cfg.num_kv_heads };
            t = crate::io::gguf::permute(&t, heads)?;
        }
        let fits = t.rank() == 2 && t.dim(1)? % quant.block_size() == 0;
        let dtype = if fits { quant } else { GgmlDType::F32 };
        written.push((name, QTensor::quantize(&t, dtype)?));
    }
    let mut file = std::fs::File::open(&src.path).map_err(|e| Error::corrupt(&src.path, e))?;
    if src.content.tensor_infos.contains_key("rope_freqs.weight") {
        let t = src.content.tensor(&mut file, "rope_freqs.weight", &Device::Cpu)?;
        written.push(("rope_freqs.weight".into(), t));
    }
    let file_type = match quant {
        GgmlDType::F32 => 0u32,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q8_0 => 7,
        other => return Err(Error::config(out, format!("cannot write `{other:?}` weights"))),
    };
    let mut metadata: Vec<(String, Value)> = src
        .content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.file_type")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.push(("general.file_type".into(), Value::U32(file_type)));
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = written.iter().map(|(k, t)| (k.as_str(), t)).collect();
    // Written beside `out`, then renamed: a failure leaves no half-written file.
    let tmp = out.with_extension("gguf.tmp");
    let result = std::fs::File::create(&tmp)
        .map_err(|e| Error::corrupt(&tmp, e))
        .and_then(|mut f| {
            candle_core::quantized::gguf_file::write(&mut f, &md, &ts)
                .map_err(|e| Error::corrupt(&tmp, e))
        })
        .and_then(|_| std::fs::rename(&tmp, out).map_err(|e| Error::corrupt(out, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
