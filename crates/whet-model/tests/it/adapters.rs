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

/// `adapter_to_gguf` against llama.cpp's own `convert_lora_to_gguf.py` on the same PEFT adapter
/// (tests/fixtures/adapters/regex.llama-cpp.gguf, by scripts/convert_fixtures_gguf.py): the same
/// metadata, tensor names, shapes and values (q rows permuted as llama.cpp permutes them).
#[test]
fn adapter_gguf_equals_llama_cpp_converter() {
    use candle_core::quantized::gguf_file;
    let cfg = base().config().clone();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("regex.gguf");
    assert_eq!(whet_model::adapter::adapter_to_gguf(&adapter_dir("regex"), &cfg, &out).unwrap(), 4);
    let read = |p: &std::path::Path| {
        let mut f = std::fs::File::open(p).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        let t: std::collections::BTreeMap<String, Vec<f32>> = c
            .tensor_infos
            .keys()
            .map(|n| {
                let q = c.tensor(&mut f, n, &Device::Cpu).unwrap();
                let v = q
                    .dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                (format!("{n} {:?}", q.shape().dims()), v)
            })
            .collect();
        (c, t)
    };
    let (ours, ours_t) = read(&out);
    let (theirs, theirs_t) =
        read(&crate::root().join("tests/fixtures/adapters/regex.llama-cpp.gguf"));
    for key in ["general.architecture", "general.type", "adapter.type"] {
        assert_eq!(
            ours.metadata[key].to_string().unwrap(),
            theirs.metadata[key].to_string().unwrap(),
            "{key}"
        );
    }
    assert_eq!(
        ours.metadata["adapter.lora.alpha"].to_f32().unwrap(),
        theirs.metadata["adapter.lora.alpha"].to_f32().unwrap()
    );
    assert_eq!(ours_t.keys().collect::<Vec<_>>(), theirs_t.keys().collect::<Vec<_>>());
    for (k, v) in &ours_t {
        let d = v.iter().zip(&theirs_t[k]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d < 1e-7, "{k}: differs by {d}");
    }
}

/// llama.cpp scales each pair by one alpha over its rank; for an rsLoRA adapter with rank and
/// alpha patterns the written B carries the rest, so that llama.cpp's `alpha / r * B A` is
/// PEFT's `scale * B A` for every module.
#[test]
fn adapter_gguf_keeps_peft_scales_that_llama_cpp_would_lose() {
    use candle_core::quantized::gguf_file;
    let model = base();
    let cfg = model.config().clone();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("patterns.gguf");
    whet_model::adapter::adapter_to_gguf(&adapter_dir("patterns"), &cfg, &out).unwrap();
    let mut f = std::fs::File::open(&out).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let alpha = c.metadata["adapter.lora.alpha"].to_f32().unwrap() as f64;
    let mut peft = base();
    let adapter = load_adapter(&mut peft, &adapter_dir("patterns")).unwrap();
    let vars: std::collections::HashMap<String, candle_core::Var> =
        peft.lora_vars().into_iter().collect();
    let mut checked = 0;
    for (name, var_a) in &vars {
        let Some(module) =
            name.strip_prefix("base_model.model.").and_then(|n| n.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        let var_b = &vars[&format!("base_model.model.{module}.lora_B.weight")];
        let want =
            (var_b.as_tensor().matmul(var_a.as_tensor()).unwrap() * adapter.scale(module)).unwrap();
        let g = whet_model::io::gguf::gguf_module_name(module).unwrap();
        let a = c
            .tensor(&mut f, &format!("{g}.weight.lora_a"), &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let mut b = c
            .tensor(&mut f, &format!("{g}.weight.lora_b"), &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        if module.ends_with("q_proj") {
            b = whet_model::io::gguf::unpermute(&b, cfg.num_heads).unwrap();
        } else if module.ends_with("k_proj") {
            b = whet_model::io::gguf::unpermute(&b, cfg.num_kv_heads).unwrap();
        }
        let r = a.dim(0).unwrap() as f64;
        let theirs = (b.matmul(&a).unwrap() * (alpha / r)).unwrap();
        let d =
            (theirs - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "{module}: llama.cpp's delta differs from PEFT's by {d}");
        checked += 1;
    }
    assert_eq!(checked, 14);
}

/// Several adapters at once, unmerged beside one base: both at weight 1 equal both merged one
/// after the other; one switched off leaves PEFT's logits of the other; the base comes back
/// with all off. Switching takes `&self`.
#[test]
fn named_adapters_apply_unmerged_and_switch() {
    let golden = crate::fixture("adapters/golden.json");
    let ids: Vec<u32> = serde_json::from_value(golden["ids"].clone()).unwrap();
    let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
    let logits = |m: &whet_model::Llama| {
        m.forward(&input, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .get(11)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let diff =
        |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let mut merged = base();
    load_adapter(&mut merged, &adapter_dir("regex")).unwrap();
    merged.merge_lora().unwrap();
    load_adapter(&mut merged, &adapter_dir("layers")).unwrap();
    merged.merge_lora().unwrap();
    let mut m = base();
    let plain = logits(&m);
    whet_model::adapter::load_named_adapter(&mut m, "r", 1.0, &adapter_dir("regex")).unwrap();
    whet_model::adapter::load_named_adapter(&mut m, "l", 1.0, &adapter_dir("layers")).unwrap();
    assert_eq!(m.adapter_names(), ["r", "l"]);
    assert!(diff(&logits(&m), &logits(&merged)) < 1e-4, "both on = both merged");
    m.set_adapter_weights(&[("r", 1.0)]).unwrap();
    let want: Vec<f32> =
        serde_json::from_value::<Vec<f64>>(golden["adapters"]["regex"]["logits"]["11"].clone())
            .unwrap()
            .into_iter()
            .map(|v| v as f32)
            .collect();
    assert!(diff(&logits(&m), &want) < 1e-4, "only `r`: PEFT's logits of that adapter");
    m.set_adapter_weights(&[]).unwrap();
    assert!(diff(&logits(&m), &plain) == 0.0, "all off: the base");
    let err = m.set_adapter_weights(&[("x", 1.0)]).unwrap_err().to_string();
    assert_eq!(err, "no adapter named `x`; loaded: r, l");
}
