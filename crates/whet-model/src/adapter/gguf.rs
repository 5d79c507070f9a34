//! A llama.cpp LoRA adapter GGUF from a PEFT adapter.

use super::{io, read_tensors, PeftAdapter};
use crate::error::Result;
use candle_core::DType;
use std::path::Path;

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
