//! LoRA on the one Llama: parameter counts, a fresh adapter changes nothing, merged equals
//! unmerged, the training path equals the inference path, and gradients match finite differences.

use candle_core::{DType, Device, Tensor};
use whet_model::lora::LoraConfig;
use whet_model::loss::masked_cross_entropy;
use whet_model::{load, LoadedModel, ModelSource, TrainPass};

fn tiny(dtype: DType) -> LoadedModel {
    load(&ModelSource::Random("tiny".into()), dtype, &Device::Cpu, 21).unwrap()
}

fn ids() -> Tensor {
    Tensor::new(&[[5u32, 17, 99, 3, 250, 7, 42, 8], [1, 2, 3, 4, 5, 6, 7, 8]], &Device::Cpu)
        .unwrap()
}

/// Which tokens of [`ids`] the loss trains.
fn loss_mask() -> Tensor {
    Tensor::new(&[[0u8, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 1, 1]], &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Give every B deterministic non-zero values (fresh adapters have B = 0, which would hide
/// bugs in the A path).
fn perturb_b(m: &whet_model::Llama, seed: u64) {
    for (name, var) in m.lora_vars() {
        if name.ends_with("lora_B.weight") {
            let n = var.elem_count();
            let v: Vec<f64> =
                (0..n).map(|k| 0.05 * ((k as f64) * 1.7 + seed as f64).sin()).collect();
            let t = Tensor::from_vec(v, var.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(var.dtype())
                .unwrap();
            var.set(&t).unwrap();
        }
    }
}

#[test]
fn trainable_parameter_counts_are_exact() {
    let mut m = load(&ModelSource::Random("smollm2-135m".into()), DType::F32, &Device::Cpu, 0)
        .unwrap()
        .model;
    m.add_lora(&LoraConfig::new(8, 16.0, 0.0, "q_proj,v_proj", false).unwrap(), 0).unwrap();
    let n: usize = m.lora_vars().iter().map(|(_, v)| v.elem_count()).sum();
    // q: 8*576 + 576*8, v: 8*576 + 192*8, 30 layers: PEFT's count for SmolLM2-135M, r=8, q/v.
    assert_eq!(n, 460_800);
    let names: Vec<String> = m.lora_vars().into_iter().map(|(n, _)| n).take(2).collect();
    assert_eq!(
        names,
        [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        ]
    );
    m.add_lora(&LoraConfig::new(8, 16.0, 0.0, "all-linear", false).unwrap(), 0).unwrap();
    let n: usize = m.lora_vars().iter().map(|(_, v)| v.elem_count()).sum();
    let per_layer = 8 * (576 + 576)
        + 2 * 8 * (576 + 192)
        + 8 * (576 + 576)
        + 2 * 8 * (576 + 1536)
        + 8 * (1536 + 576);
    assert_eq!(n, 30 * per_layer);
}

#[test]
fn fresh_adapter_is_the_base_and_merged_equals_unmerged() {
    let base = tiny(DType::F32);
    let want = base.model.forward(&ids(), None).unwrap();
    let mut m = base.model.clone();
    m.add_lora(&LoraConfig::new(4, 8.0, 0.0, "all-linear", false).unwrap(), 1).unwrap();
    assert_eq!(max_diff(&m.forward(&ids(), None).unwrap(), &want), 0.0, "B = 0: nothing changes");
    perturb_b(&m, 2);
    let adapted = m.forward(&ids(), None).unwrap();
    assert!(max_diff(&adapted, &want) > 1e-3, "the adapter changes the output");
    m.merge_lora().unwrap();
    assert!(m.lora_vars().is_empty());
    let merged = m.forward(&ids(), None).unwrap();
    assert!(max_diff(&merged, &adapted) < 1e-4, "merged {}", max_diff(&merged, &adapted));
}

#[test]
fn training_path_equals_inference_path() {
    let mut m = tiny(DType::F32).model;
    m.add_lora(&LoraConfig::new(4, 8.0, 0.0, "q_proj,v_proj,down_proj", false).unwrap(), 1)
        .unwrap();
    perturb_b(&m, 3);
    let infer = m.forward(&ids(), None).unwrap();
    let (train, _) = m.forward_train(&ids(), &TrainPass::default()).unwrap();
    assert!(max_diff(&infer, &train) < 1e-4, "{}", max_diff(&infer, &train));
}

/// Every LoRA parameter kind (A and B of q, k, v, o, gate, up, down) gets the gradient finite
/// differences give, in f64, through the training path, adapter dropout on (its masks are
/// fixed by the dropout seed, so every forward pass draws the same ones).
#[test]
fn lora_gradients_match_finite_differences() {
    let mut m = tiny(DType::F64).model;
    m.add_lora(&LoraConfig::new(2, 4.0, 0.1, "all-linear", false).unwrap(), 5).unwrap();
    perturb_b(&m, 4);
    let ids = ids();
    let mask = loss_mask();
    let pass = TrainPass::default();
    let loss = |m: &whet_model::Llama| -> f64 {
        let logits = m.forward_train(&ids, &pass).unwrap().0;
        masked_cross_entropy(&logits, &ids, &mask).unwrap().0.to_scalar::<f64>().unwrap()
    };
    let (logits, collector) = m.forward_train(&ids, &pass).unwrap();
    let grads = collector.backward(&masked_cross_entropy(&logits, &ids, &mask).unwrap().0).unwrap();
    let vars = m.lora_vars();
    assert_eq!(vars.len(), 2 * 7 * 2);
    for (name, var) in vars
        .iter()
        .filter(|(n, _)| n.contains("layers.1.") || n.contains("layers.0.self_attn.q_proj"))
    {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let orig = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for idx in [0, orig.len() / 2, orig.len() - 1] {
            let eps = 1e-5;
            let set = |delta: f64| {
                let mut v = orig.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
            };
            set(eps);
            let up = loss(&m);
            set(-eps);
            let down = loss(&m);
            set(0.0);
            let fd = (up - down) / (2.0 * eps);
            assert!(
                (fd - g[idx]).abs() < 1e-6 + 1e-4 * fd.abs(),
                "{name}[{idx}]: autograd {} vs finite difference {fd}",
                g[idx]
            );
        }
    }
}

/// Gradient checkpointing recomputes each block in the backward pass: with adapter dropout on
/// (the recomputation must draw the same masks), every adapter's gradient equals the plain
/// backward pass's.
#[test]
fn grad_checkpointing_gives_the_same_gradients() {
    let mut m = tiny(DType::F64).model;
    m.add_lora(&LoraConfig::new(2, 4.0, 0.1, "all-linear", false).unwrap(), 5).unwrap();
    perturb_b(&m, 6);
    let ids = ids();
    let mask = loss_mask();
    let grads = |pass: TrainPass| {
        let (logits, collector) = m.forward_train(&ids, &pass).unwrap();
        collector.backward(&masked_cross_entropy(&logits, &ids, &mask).unwrap().0).unwrap()
    };
    let plain = grads(TrainPass { dropout_seed: 9, ..TrainPass::default() });
    let checkpointed = grads(TrainPass { dropout_seed: 9, grad_checkpoint: true, first_row: 0 });
    for (name, var) in m.lora_vars() {
        let (a, b) = (plain.get(&var).unwrap(), checkpointed.get(&var));
        let b = b.unwrap_or_else(|| panic!("no gradient for {name} with checkpointing"));
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(scale > 0.0, "{name}: zero gradient");
        assert!(max_diff(a, b) <= 1e-12 * scale.max(1.0), "{name}: {}", max_diff(a, b));
    }
}

/// One step against PyTorch + PEFT (`scripts/reference_lora.py`, tests/fixtures/lora_golden.json):
/// same GGUF weights, LoRA r=4 alpha=8 on every linear layer, adapters filled with the same
/// deterministic pattern; the masked loss and the adapter gradients of layers 0 and 29 agree.
/// Tolerances: f32 through 30 layers with different summation orders — 1e-4 relative on the
/// loss, 2e-3 relative (plus 1e-7 absolute) on gradient sums and entries.
#[test]
fn one_step_equals_pytorch_peft() {
    let Some(path) = crate::default_model() else { return };
    let golden = crate::fixture("lora_golden.json");
    let mut m = load(&ModelSource::Gguf(path), DType::F32, &Device::Cpu, 0).unwrap().model;
    m.add_lora(&LoraConfig::new(4, 8.0, 0.0, "all-linear", false).unwrap(), 0).unwrap();
    for (name, var) in m.lora_vars() {
        let seed = (name.bytes().map(u32::from).sum::<u32>() % 1000) as f64;
        let v: Vec<f32> =
            (0..var.elem_count()).map(|k| (0.02 * (0.1 * k as f64 + seed).sin()) as f32).collect();
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    let ids: Vec<u32> = serde_json::from_value(golden["ids"].clone()).unwrap();
    let from = golden["trained_from"].as_u64().unwrap() as usize;
    let mask: Vec<u8> = (0..ids.len()).map(|t| u8::from(t >= from)).collect();
    let n = ids.len();
    let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (1, n), &Device::Cpu).unwrap();
    let (logits, collector) = m.forward_train(&ids, &TrainPass::default()).unwrap();
    let (loss, _) = masked_cross_entropy(&logits, &ids, &mask).unwrap();
    let want = golden["loss"].as_f64().unwrap();
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() < 1e-4 * want.abs(), "loss {got} vs PyTorch {want}");
    let grads = collector.backward(&loss).unwrap();
    let vars: std::collections::HashMap<String, candle_core::Var> =
        m.lora_vars().into_iter().collect();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-7 + 2e-3 * b.abs().max(a.abs());
    let expected = golden["grads"].as_object().unwrap();
    assert_eq!(expected.len(), 28);
    for (name, g) in expected {
        let ours = grads.get(&vars[name]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let sum: f64 = ours.iter().map(|v| *v as f64).sum();
        let abs_sum: f64 = ours.iter().map(|v| v.abs() as f64).sum();
        assert!(
            close(abs_sum, g["abs_sum"].as_f64().unwrap()),
            "{name}: |grad| sum {abs_sum} vs {}",
            g["abs_sum"]
        );
        assert!(
            (sum - g["sum"].as_f64().unwrap()).abs() <= 2e-3 * abs_sum + 1e-7,
            "{name}: grad sum {sum} vs {}",
            g["sum"]
        );
        let first: Vec<f64> = serde_json::from_value(g["first"].clone()).unwrap();
        for (k, want) in first.iter().enumerate() {
            assert!(
                (ours[k] as f64 - want).abs()
                    <= 1e-7 + 2e-3 * abs_sum / ours.len() as f64 * 10.0 + 2e-3 * want.abs(),
                "{name}[{k}]: {} vs {want}",
                ours[k]
            );
        }
    }
}

/// QLoRA: training over a base kept block-quantized (Q4_0, Q8_0; linear layers and the
/// embedding table) gives the loss and adapter
/// gradients of training over a dense base holding the same dequantized values, and a prefill
/// over it the same logits: the dequantizing kernel (under `WHET_KERNELS=portable`, the
/// composed path) changes the memory, not the arithmetic.
#[test]
fn qlora_equals_training_over_the_dequantized_base() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use whet_model::io::presets;
    let dev = Device::Cpu;
    // A tied head shares the embedding table's blocks.
    for (q, tied) in [(GgmlDType::Q4_0, false), (GgmlDType::Q8_0, false), (GgmlDType::Q8_0, true)] {
        let mut cfg = presets::preset("tiny").unwrap();
        cfg.tie_word_embeddings = tied;
        let raw = presets::random_weights(&cfg, DType::F32, &dev, 21).unwrap();
        let mut w = raw.clone();
        for (name, t) in w.iter_mut() {
            // The embedding table too: on the CPU it is kept quantized (the head's blocks
            // when tied).
            if name.ends_with("proj.weight")
                || name == "lm_head.weight"
                || name == "model.embed_tokens.weight"
            {
                *t = QTensor::quantize(t, q).unwrap().dequantize(&dev).unwrap();
            }
        }
        let vb = candle_nn::VarBuilder::from_tensors(w, DType::F32, &dev);
        let mut dense = whet_model::Llama::load(vb, &cfg).unwrap();
        let tiny = ModelSource::Random("tiny".into());
        let mut quant = if tied {
            let vb = candle_nn::VarBuilder::from_tensors(raw, DType::F32, &dev);
            whet_model::Llama::load_quantized(vb, &cfg, Some(q)).unwrap()
        } else {
            whet_model::load_quantized(&tiny, DType::F32, &dev, 21, Some(q)).unwrap().model
        };
        // 80 tokens: a prefill long enough for the tiled product (up to 47 take integer block
        // dot products, which quantize the activations too).
        let long = Tensor::arange(0u32, 80, &dev).unwrap().unsqueeze(0).unwrap();
        let prefill = |m: &whet_model::Llama| m.forward(&long, None).unwrap();
        let (a, b) = (prefill(&dense), prefill(&quant));
        assert!(max_diff(&a, &b) < 1e-5, "{q:?} tied {tied} prefill: {}", max_diff(&a, &b));
        let lora = LoraConfig::new(4, 8.0, 0.0, "all-linear", false).unwrap();
        for m in [&mut dense, &mut quant] {
            m.add_lora(&lora, 5).unwrap();
            perturb_b(m, 3);
        }
        let step = |m: &whet_model::Llama| {
            let (logits, collector) = m.forward_train(&ids(), &TrainPass::default()).unwrap();
            let loss = masked_cross_entropy(&logits, &ids(), &loss_mask()).unwrap().0;
            let grads = collector.backward(&loss).unwrap();
            let named: Vec<(String, Tensor)> = m
                .lora_vars()
                .into_iter()
                .map(|(n, v)| (n, grads.get(&v).expect("a gradient per adapter").clone()))
                .collect();
            (loss.to_scalar::<f32>().unwrap(), named)
        };
        let ((l1, g1), (l2, g2)) = (step(&dense), step(&quant));
        assert!((l1 - l2).abs() < 1e-5 * l1.abs(), "{q:?} loss {l1} vs {l2}");
        assert_eq!(g1.len(), g2.len());
        for ((name, a), (_, b)) in g1.iter().zip(&g2) {
            let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            assert!(scale > 0.0, "{name}: zero gradient");
            assert!(max_diff(a, b) < 1e-4 * scale, "{q:?} {name}: {}", max_diff(a, b));
        }
    }
}

/// The reference pass of preference objectives: the model with its trained adapter left out
/// is the base, exactly, whatever the adapter holds; the adapter itself is untouched (the next
/// ordinary pass has it again), and named adapters still apply.
#[test]
fn the_reference_pass_is_the_base_without_a_copy_of_it() {
    let base = tiny(DType::F32);
    let plain = base.model.hidden(&ids(), None).unwrap();
    let mut m = tiny(DType::F32);
    m.model.add_lora(&LoraConfig::new(4, 8.0, 0.0, "all-linear", false).unwrap(), 3).unwrap();
    perturb_b(&m.model, 5);
    let adapted = m.model.hidden(&ids(), None).unwrap();
    assert!(max_diff(&adapted, &plain) > 1e-3, "the adapter must change the output");
    let reference = m.model.hidden_reference(&ids(), None).unwrap();
    assert_eq!(max_diff(&reference, &plain), 0.0);
    assert_eq!(max_diff(&m.model.hidden(&ids(), None).unwrap(), &adapted), 0.0);
    // With a frozen named adapter beside the trained one, the reference is the base with it.
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let mut with =
        load(&ModelSource::HfDir(dir.join("families/llama3")), DType::F32, &Device::Cpu, 0)
            .unwrap();
    let only_named = {
        whet_model::adapter::load_named_adapter(
            &mut with.model,
            "frozen",
            1.0,
            &dir.join("adapters/patterns"),
        )
        .unwrap();
        with.model.hidden(&ids(), None).unwrap()
    };
    with.model.add_lora(&LoraConfig::new(4, 8.0, 0.0, "q_proj,v_proj", false).unwrap(), 3).unwrap();
    perturb_b(&with.model, 7);
    let reference = with.model.hidden_reference(&ids(), None).unwrap();
    assert!(max_diff(&reference, &only_named) < 1e-6, "{}", max_diff(&reference, &only_named));
}
