//! Adapters written by PEFT itself (`scripts/reference_adapters.py`, tests/fixtures/adapters/)
//! on the tiny Llama fixture: rank and alpha patterns with rsLoRA, a regular-expression
//! `target_modules`, `layers_to_transform` with `exclude_modules`. Loaded unmerged and merged,
//! whet's logits and greedy tokens equal PEFT's; DoRA and `modules_to_save` are refused by name.

use candle_core::{DType, Device, Tensor};
use whet_model::adapter::{load_adapter, PeftAdapter};
use whet_model::{load, ModelSource};

fn base() -> whet_model::Llama {
    let dir = crate::root().join("tests/fixtures/families/llama3");
    load(&ModelSource::HfDir(dir), DType::F32, &Device::Cpu, 0).unwrap().model
}

fn adapter_dir(name: &str) -> std::path::PathBuf {
    crate::root().join("tests/fixtures/adapters").join(name)
}

#[test]
fn peft_adapters_load_as_peft_computes_them() {
    let golden = crate::fixture("adapters/golden.json");
    let ids: Vec<u32> = serde_json::from_value(golden["ids"].clone()).unwrap();
    let n = ids.len();
    let input = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
    let adapters = golden["adapters"].as_object().unwrap();
    assert_eq!(adapters.len(), 3);
    for (name, want) in adapters {
        let mut model = base();
        load_adapter(&mut model, &adapter_dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let wrapped: Vec<String> = serde_json::from_value(want["wrapped"].clone()).unwrap();
        let mut ours: Vec<String> = model
            .lora_vars()
            .into_iter()
            .filter(|(k, _)| k.ends_with("lora_A.weight"))
            .map(|(k, _)| {
                k.trim_start_matches("base_model.model.")
                    .trim_end_matches(".lora_A.weight")
                    .to_string()
            })
            .collect();
        ours.sort();
        let theirs: Vec<String> =
            wrapped.iter().map(|w| w.trim_start_matches("base_model.model.").to_string()).collect();
        assert_eq!(ours, theirs, "{name}: wrapped modules");
        for merged in [false, true] {
            let mut model = model.clone();
            if merged {
                model.merge_lora().unwrap();
            }
            let logits = model.forward(&input, None).unwrap().squeeze(0).unwrap();
            for (t, row) in want["logits"].as_object().unwrap() {
                let t: usize = t.parse().unwrap();
                let got = logits.get(t).unwrap().to_vec1::<f32>().unwrap();
                let want: Vec<f64> = serde_json::from_value(row.clone()).unwrap();
                let d =
                    got.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
                assert!(d < 1e-4, "{name} (merged {merged}): logits at {t} differ by {d}");
            }
            let greedy = crate::greedy(&model, &input, 8);
            let want: Vec<u32> = serde_json::from_value(want["greedy"].clone()).unwrap();
            assert_eq!(greedy, want, "{name} (merged {merged}): greedy tokens");
        }
    }
}

/// PEFT's pattern matching: a short name matches every module ending in it, a full path one
/// module; rsLoRA scales by `alpha / sqrt(r)`.
#[test]
fn rank_and_alpha_patterns_follow_peft() {
    let a = PeftAdapter::read(&adapter_dir("patterns")).unwrap();
    assert_eq!(a.rank_alpha("model.layers.0.self_attn.v_proj"), (6, 8.0));
    assert_eq!(a.rank_alpha("model.layers.1.mlp.down_proj"), (2, 8.0));
    assert_eq!(a.rank_alpha("model.layers.0.mlp.down_proj"), (4, 8.0));
    assert_eq!(a.rank_alpha("model.layers.1.self_attn.o_proj"), (4, 3.0));
    assert_eq!(a.scale("model.layers.0.self_attn.q_proj"), 8.0 / 2.0);
    let l = PeftAdapter::read(&adapter_dir("layers")).unwrap();
    assert!(l.targets("model.layers.1.self_attn.q_proj"));
    assert!(!l.targets("model.layers.0.self_attn.q_proj"), "layers_to_transform = [1]");
    assert!(!l.targets("model.layers.1.self_attn.v_proj"), "excluded");
}

/// Regression: an adapter with `use_dora` or `modules_to_save` loaded as a plain LoRA and
/// computed something else, without a word.
#[test]
fn fields_whet_does_not_implement_are_refused_by_name() {
    for (name, field) in
        [("dora", "`use_dora` = `true`"), ("saved", "`modules_to_save` = `[\"lm_head\"]`")]
    {
        let mut model = base();
        let err = load_adapter(&mut model, &adapter_dir(name)).unwrap_err().to_string();
        let config = adapter_dir(name).join("adapter_config.json");
        assert!(
            err.starts_with(&format!(
                "{}: {field} changes what the adapter computes",
                config.display()
            )),
            "{err}"
        );
    }
    // A tensor for a module whet does not adapt (PEFT's lm_head adapter) is an error too.
    let dir = tempfile::tempdir().unwrap();
    let src = adapter_dir("regex");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    config["target_modules"] = serde_json::json!(".*\\.(q_proj|gate_proj|lm_head)");
    std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
    let mut tensors =
        candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    tensors.insert(
        "base_model.model.lm_head.lora_A.weight".into(),
        Tensor::zeros((3, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.path().join("adapter_model.safetensors")).unwrap();
    let err = load_adapter(&mut base(), dir.path()).unwrap_err().to_string();
    assert!(err.contains("tensor `base_model.model.lm_head.lora_A.weight` (1 in all) belongs to no module whet adapts"), "{err}");
    // A pickle adapter gets a hint to convert.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("adapter_config.json"), dir.path().join("adapter_config.json")).unwrap();
    std::fs::write(dir.path().join("adapter_model.bin"), b"pickle").unwrap();
    let err = load_adapter(&mut base(), dir.path()).unwrap_err().to_string();
    assert!(err.contains("hint: save it with safetensors"), "{err}");
}
