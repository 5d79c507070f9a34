//! Every family against transformers (`scripts/reference_families.py`,
//! tests/fixtures/families/): tiny random Llama (plain, and with llama3 RoPE scaling), Mistral (sliding window 4,
//! shorter than the sequence), Qwen2 (q/k/v biases) and Qwen3 (q/k norm, tied head), loaded from
//! their Hugging Face directories and from the GGUF files llama.cpp's converter made of them
//! (`scripts/convert_fixtures_gguf.py`). Logits, the greedy continuation and one PEFT LoRA step
//! agree.
//! Tolerances: f32 with other summation orders through 2 layers — 1e-4 on logits of size ~10,
//! 1e-4 relative on the loss, 1e-3 relative on gradient sums.

use candle_core::{DType, Device, Tensor};
use whet_model::lora::LoraConfig;
use whet_model::loss::masked_cross_entropy;
use whet_model::{load, ModelSource, TrainPass};

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max)
}

#[test]
fn every_family_matches_transformers() {
    let golden = crate::fixture("families/golden.json");
    let families = golden["families"].as_object().unwrap();
    assert_eq!(families.len(), 5);
    for (name, want) in families {
        let dir = crate::root().join("tests/fixtures/families").join(name);
        let m = load(&ModelSource::HfDir(dir), DType::F32, &Device::Cpu, 0).unwrap();
        assert_eq!(m.config.arch.name(), want["arch"].as_str().unwrap(), "{name}");
        check(&format!("{name} (HF)"), m.model, want, &golden, usize::MAX);
    }
}

/// The GGUF files llama.cpp's converter wrote from the same checkpoints. Its `llama` GGUFs
/// name no family: Mistral's comes out as `llama` without its sliding window (llama.cpp's
/// converter does not write one), so it is compared where the window does not yet matter, the
/// first 4 positions; Llama 3's scaling arrives as `rope_freqs.weight`.
#[test]
fn every_family_gguf_matches_transformers() {
    let golden = crate::fixture("families/golden.json");
    for (name, want) in golden["families"].as_object().unwrap() {
        let path = crate::root().join("tests/fixtures/families").join(format!("{name}.gguf"));
        let m = load(&ModelSource::Gguf(path), DType::F32, &Device::Cpu, 0).unwrap();
        let (arch, within) = match name.as_str() {
            "mistral" => ("llama", 4),
            _ => (want["arch"].as_str().unwrap(), usize::MAX),
        };
        assert_eq!(m.config.arch.name(), arch, "{name}");
        if name == "llama3" {
            assert!(
                matches!(m.config.rope_scaling, whet_model::config::RopeScaling::Factors(_)),
                "{:?}",
                m.config.rope_scaling
            );
        }
        check(&format!("{name} (GGUF)"), m.model, want, &golden, within);
    }
}

/// Logits at the golden positions before `within`, and, when the whole sequence is within,
/// the greedy continuation and the LoRA step.
fn check(
    name: &str,
    mut model: whet_model::Llama,
    want: &serde_json::Value,
    golden: &serde_json::Value,
    within: usize,
) {
    let ids: Vec<u32> = serde_json::from_value(golden["ids"].clone()).unwrap();
    let from = golden["trained_from"].as_u64().unwrap() as usize;
    let n = ids.len();
    {
        let input = Tensor::from_vec(ids.clone(), (1, n), &Device::Cpu).unwrap();

        // Logits at a few positions.
        let logits = model.forward(&input, None).unwrap().squeeze(0).unwrap();
        for (t, row) in want["logits"].as_object().unwrap() {
            let t: usize = t.parse().unwrap();
            if t >= within {
                continue;
            }
            let ours = logits.get(t).unwrap().to_vec1::<f32>().unwrap();
            let theirs: Vec<f64> = serde_json::from_value(row.clone()).unwrap();
            let d = max_abs_diff(&ours, &theirs);
            assert!(d < 1e-4, "{name}: logits at {t} differ by {d}");
        }

        if within < n {
            return;
        }
        // Greedy continuation through the KV cache (decoding past Mistral's window).
        let greedy = crate::greedy(&model, &input, 8);
        let want_greedy: Vec<u32> = serde_json::from_value(want["greedy"].clone()).unwrap();
        assert_eq!(greedy, want_greedy, "{name}: greedy tokens");

        // One PEFT LoRA step from the same adapter values.
        let lora = &want["lora"];
        let cfg = LoraConfig::new(2, 4.0, 0.0, "all-linear", false).unwrap();
        model.add_lora(&cfg, 0).unwrap();
        let vars: std::collections::HashMap<String, candle_core::Var> =
            model.lora_vars().into_iter().collect();
        for (key, var) in &vars {
            let seed = (key.bytes().map(u32::from).sum::<u32>() % 1000) as f64;
            let v: Vec<f32> = (0..var.elem_count())
                .map(|k| (0.05 * (0.1 * k as f64 + seed).sin()) as f32)
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        let mask: Vec<u8> = (0..n).map(|t| u8::from(t >= from)).collect();
        let mask = Tensor::from_vec(mask, (1, n), &Device::Cpu).unwrap();
        let (logits, collector) = model.forward_train(&input, &TrainPass::default()).unwrap();
        let (loss, _) = masked_cross_entropy(&logits, &input, &mask).unwrap();
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        let want_loss = lora["loss"].as_f64().unwrap();
        assert!(
            (got - want_loss).abs() < 1e-4 * want_loss.abs(),
            "{name}: loss {got} vs {want_loss}"
        );
        let grads = collector.backward(&loss).unwrap();
        let expected = lora["grads"].as_object().unwrap();
        assert_eq!(expected.len(), vars.len(), "{name}: adapter count");
        for (key, g) in expected {
            let ours =
                grads.get(&vars[key]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let abs: f64 = ours.iter().map(|v| v.abs() as f64).sum();
            let sum: f64 = ours.iter().map(|v| *v as f64).sum();
            let (want_abs, want_sum) = (g["abs_sum"].as_f64().unwrap(), g["sum"].as_f64().unwrap());
            assert!(
                (abs - want_abs).abs() <= 1e-3 * want_abs + 1e-7,
                "{name} {key}: |g| {abs} vs {want_abs}"
            );
            assert!(
                (sum - want_sum).abs() <= 1e-3 * want_abs + 1e-7,
                "{name} {key}: sum {sum} vs {want_sum}"
            );
        }
    }
}
