//! Loading a Llama/Qwen2 model from a GGUF file (llama.cpp's format): metadata to [`ConfigFile`],
//! tensors dequantized and renamed to Hugging Face names so adapters stay PEFT-compatible.

use crate::config::{ConfigFile, RopeScalingFile, TokenIds};
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// An opened GGUF file: its header and where it lives.
pub struct GgufFile {
    /// Path of the file, for errors.
    pub path: PathBuf,
    /// Header: metadata and tensor directory.
    pub content: Content,
}

impl GgufFile {
    /// Read the header of a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = open(path)?;
        let content = Content::read(&mut file)
            .map_err(|e| Error::corrupt(path, format!("not a readable GGUF file: {e}")))?;
        // A truncated file still has an intact header; check that every tensor's data is there.
        let size = file.metadata().map_err(|e| Error::corrupt(path, e))?.len();
        for (name, info) in &content.tensor_infos {
            let bytes = info.shape.elem_count() / info.ggml_dtype.block_size()
                * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > size {
                return Err(Error::corrupt(
                    path,
                    format!("truncated GGUF file: tensor `{name}` ends at byte {end} but the file has {size} bytes"),
                ));
            }
        }
        Ok(Self { path: path.to_path_buf(), content })
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_str(&self, key: &str) -> Option<String> {
        self.meta(key).and_then(|v| v.to_string().ok()).cloned()
    }

    fn meta_usize(&self, key: &str) -> Option<usize> {
        self.meta(key)
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
            .map(|v| v as usize)
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta(key).and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
    }

    fn require_usize(&self, key: &str) -> Result<usize> {
        self.meta_usize(key)
            .ok_or_else(|| Error::config(&self.path, format!("missing GGUF metadata key `{key}`")))
    }

    /// The chat template stored in the file, if any.
    pub fn chat_template(&self) -> Option<String> {
        self.meta_str("tokenizer.chat_template")
    }

    /// The architecture name (`general.architecture`).
    pub fn architecture(&self) -> Result<String> {
        self.meta_str("general.architecture").ok_or_else(|| {
            Error::config(&self.path, "missing GGUF metadata key `general.architecture`")
        })
    }

    /// The model configuration, with Hugging Face names.
    pub fn config_file(&self) -> Result<ConfigFile> {
        let arch = self.architecture()?;
        crate::config::Arch::parse(&arch).map_err(|msg| Error::config(&self.path, msg))?;
        let key = |k: &str| format!("{arch}.{k}");
        let num_heads = self.require_usize(&key("attention.head_count"))?;
        let hidden_size = self.require_usize(&key("embedding_length"))?;
        let vocab_size = match self.meta_usize(&key("vocab_size")) {
            Some(v) => v,
            None => self
                .content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| {
                Error::config(&self.path, "missing tensor `token_embd.weight`")
            })?,
        };
        let rope_scaling = self.meta_str(&key("rope.scaling.type")).map(|t| RopeScalingFile {
            rope_type: Some(t),
            factor: self.meta_f64(&key("rope.scaling.factor")),
            ..Default::default()
        });
        Ok(ConfigFile {
            model_type: Some(arch.clone()),
            architectures: vec![],
            hidden_size,
            intermediate_size: self.require_usize(&key("feed_forward_length"))?,
            num_hidden_layers: self.require_usize(&key("block_count"))?,
            num_attention_heads: num_heads,
            num_key_value_heads: self.meta_usize(&key("attention.head_count_kv")),
            head_dim: self.meta_usize(&key("attention.key_length")),
            vocab_size,
            rms_norm_eps: self.meta_f64(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            rope_theta: self.meta_f64(&key("rope.freq_base")),
            rope_scaling,
            rope_parameters: None,
            max_position_embeddings: self.meta_usize(&key("context_length")),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: Some(self.content.tensor_infos.contains_key("blk.0.attn_q.bias")),
            sliding_window: self.meta_usize(&key("attention.sliding_window")),
            use_sliding_window: None,
            mlp_bias: None,
            hidden_act: None,
            num_local_experts: self.meta_usize(&key("expert_count")),
            num_experts: None,
            rope_freq_factors: self.rope_freq_factors()?,
            bos_token_id: self
                .meta_usize("tokenizer.ggml.bos_token_id")
                .map(|i| TokenIds::One(i as u32)),
            eos_token_id: self
                .meta_usize("tokenizer.ggml.eos_token_id")
                .map(|i| TokenIds::One(i as u32)),
        })
    }

    /// The values of `rope_freqs.weight`, when the file has it (Llama 3.1+ converted by
    /// llama.cpp: the llama3 RoPE scaling, precomputed per frequency).
    fn rope_freq_factors(&self) -> Result<Option<Vec<f64>>> {
        if !self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Ok(None);
        }
        let mut file = open(&self.path)?;
        let t = self
            .content
            .tensor(&mut file, "rope_freqs.weight", &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>())
            .map_err(|e| Error::corrupt(&self.path, format!("tensor `rope_freqs.weight`: {e}")))?;
        Ok(Some(t.into_iter().map(f64::from).collect()))
    }

    /// Every tensor, dequantized to `dtype` on `device`, under its Hugging Face name.
    ///
    /// llama.cpp's converter permutes the rows of Llama's q/k projections so that RoPE can rotate
    /// interleaved pairs; whet (like transformers) rotates halves, so the permutation is undone.
    pub fn tensors(
        &self,
        num_heads: usize,
        num_kv_heads: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let permuted = self.architecture()? == "llama";
        let mut file = open(&self.path)?;
        let mut out = HashMap::new();
        for name in self.content.tensor_infos.keys() {
            if name == "rope_freqs.weight" {
                continue; // part of the configuration (see `rope_freq_factors`)
            }
            let Some(hf_name) = hf_name(name) else {
                // A tensor whet has no place for would change the outputs if it mattered.
                return Err(Error::config(
                    &self.path,
                    format!(
                        "tensor `{name}` is not part of a `{}` model whet knows",
                        self.architecture()?
                    ),
                ));
            };
            let q = self
                .content
                .tensor(&mut file, name, &Device::Cpu)
                .map_err(|e| Error::corrupt(&self.path, format!("tensor `{name}`: {e}")))?;
            let mut t = q.dequantize(&Device::Cpu)?;
            if permuted && (name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias")) {
                t = unpermute(&t, num_heads)?;
            } else if permuted && (name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias"))
            {
                t = unpermute(&t, num_kv_heads)?;
            }
            out.insert(hf_name, t.to_dtype(dtype)?.to_device(device)?);
        }
        Ok(out)
    }
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound { path: path.to_path_buf() },
        _ => Error::corrupt(path, e),
    })
}

/// Undo llama.cpp's q/k row permutation: `[out, in]` rows grouped per head as interleaved pairs
/// back to Hugging Face's halves. Also works for a bias (`[out]`).
pub fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let inner = if dims.len() == 2 { dims[1] } else { 1 };
    let head_dim = out / heads;
    w.reshape((heads, head_dim / 2, 2, inner))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// llama.cpp's q/k row permutation (`convert_hf_to_gguf.py`'s `LlamaModel.permute`), the inverse
/// of [`unpermute`]: Hugging Face's rotate-halves rows to interleaved pairs.
pub fn permute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let inner = if dims.len() == 2 { dims[1] } else { 1 };
    let head_dim = dims[0] / heads;
    w.reshape((heads, 2, head_dim / 2, inner))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// GGUF's names for the tensors outside the blocks, and Hugging Face's.
const FIXED_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// GGUF's names for the modules of a block (`blk.N.attn_q`), and Hugging Face's
/// (`model.layers.N.self_attn.q_proj`): the one map both directions use.
const BLOCK_NAMES: [(&str, &str); 11] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// The GGUF name of a Hugging Face module path (`model.layers.3.self_attn.q_proj` ->
/// `blk.3.attn_q`).
pub fn gguf_module_name(path: &str) -> Option<String> {
    let rest = path.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let (g, _) = BLOCK_NAMES.iter().find(|(_, hf)| *hf == module)?;
    Some(format!("blk.{layer}.{g}"))
}

/// The GGUF name of a Hugging Face tensor (`model.norm.weight` -> `output_norm.weight`).
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = FIXED_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let (module, kind) = hf.rsplit_once('.')?;
    Some(format!("{}.{kind}", gguf_module_name(module)?))
}

/// The Hugging Face name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`).
fn hf_name(name: &str) -> Option<String> {
    if let Some((_, hf)) = FIXED_NAMES.iter().find(|(g, _)| *g == name) {
        return Some(hf.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (_, hf) = BLOCK_NAMES.iter().find(|(g, _)| *g == module)?;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_gguf_names_to_hugging_face_names() {
        assert_eq!(
            hf_name("blk.12.attn_k.weight").as_deref(),
            Some("model.layers.12.self_attn.k_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(
            hf_name("blk.1.attn_q_norm.weight").as_deref(),
            Some("model.layers.1.self_attn.q_norm.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn permute_and_unpermute_are_inverses() {
        let w = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((8, 3)).unwrap();
        let back = unpermute(&permute(&w, 2).unwrap(), 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert_eq!(
            gguf_module_name("model.layers.3.mlp.down_proj").as_deref(),
            Some("blk.3.ffn_down")
        );
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp's convert_hf_to_gguf.py: w.reshape(h, 2, d/2, in).swapaxes(1, 2).reshape(out, in)
        let (heads, head_dim, inner) = (2, 4, 3);
        let w = Tensor::arange(0f32, (heads * head_dim * inner) as f32, &Device::Cpu).unwrap();
        let w = w.reshape((heads * head_dim, inner)).unwrap();
        let permuted = w
            .reshape((heads, 2, head_dim / 2, inner))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * head_dim, inner))
            .unwrap();
        let back = unpermute(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
