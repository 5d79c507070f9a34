//! Every way to name a model loads the same network: a Hugging Face directory (single file and
//! sharded), a hub id from a cache laid out like hf-hub's, and random presets.

use candle_core::{DType, Device, Tensor};
use std::path::Path;
use whet_model::io::presets::{preset, random_weights};
use whet_model::{load, ModelSource};

/// Write `random:tiny` (seed 11) as a Hugging Face directory; `shards` > 1 writes an index.
pub fn write_tiny_hf_dir(dir: &Path, shards: usize) {
    let mut cfg = preset("tiny").unwrap();
    cfg.eos_token_ids = vec![0];
    let tensors = random_weights(&cfg, DType::F32, &Device::Cpu, 11).unwrap();
    let mut tok = whet_model::ModelTokenizer::byte_level().unwrap();
    tok.chat_template = Some("{{ messages[0]['content'] }}".into());
    tok.eos_token = Some("<|im_end|>".into());
    whet_model::io::export::save_hf_dir(dir, &cfg, &tensors, &tok, shards).unwrap();
}

fn logits(source: &ModelSource) -> Vec<f32> {
    let m = load(source, DType::F32, &Device::Cpu, 11).unwrap();
    let ids = Tensor::new(&[[3u32, 80, 81, 200]], &Device::Cpu).unwrap();
    m.model.forward_last(&ids, None).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn hf_directory_single_and_sharded_equal_the_random_preset() {
    let want = logits(&ModelSource::Random("tiny".into()));
    for shards in [1, 3] {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_hf_dir(dir.path(), shards);
        let source = ModelSource::parse(dir.path().to_str().unwrap()).unwrap();
        assert!(matches!(source, ModelSource::HfDir(_)));
        assert_eq!(logits(&source), want, "{shards} shard(s)");
        let m = load(&source, DType::F32, &Device::Cpu, 0).unwrap();
        assert_eq!(m.tokenizer.chat_template.as_deref(), Some("{{ messages[0]['content'] }}"));
        assert_eq!(m.tokenizer.eos_token.as_deref(), Some("<|im_end|>"));
    }
}

#[test]
fn random_presets_reproduce_from_their_seed() {
    assert_eq!(
        logits(&ModelSource::Random("tiny".into())),
        logits(&ModelSource::Random("tiny".into()))
    );
    let m = load(&ModelSource::Random("smollm2-135m".into()), DType::F32, &Device::Cpu, 0).unwrap();
    assert_eq!(m.config.num_parameters(), 134_515_008);
}

#[test]
fn bf16_and_f16_weights_track_f32() {
    let ids = Tensor::new(&[[3u32, 80, 81, 200]], &Device::Cpu).unwrap();
    let base = logits(&ModelSource::Random("tiny".into()));
    for dtype in [DType::BF16, DType::F16] {
        let m = load(&ModelSource::Random("tiny".into()), dtype, &Device::Cpu, 11).unwrap();
        let got: Vec<f32> =
            m.model.forward_last(&ids, None).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let err = got.iter().zip(&base).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 0.05, "{dtype:?}: {err}");
    }
}

/// hf-hub's cache layout: `$HF_HOME/hub/models--org--name/{refs/main, snapshots/<rev>/...}`.
/// The lookup runs in a child `whet info` process so the environment stays per-test.
#[test]
fn hub_id_resolves_from_an_offline_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--whet-test--tiny");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    write_tiny_hf_dir(&snap, 1);
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let dir = whet_model::io::hub::resolve_hub("whet-test/tiny").unwrap();
    assert_eq!(dir, snap);
    assert_eq!(
        logits(&ModelSource::Hub("whet-test/tiny".into())),
        logits(&ModelSource::Random("tiny".into()))
    );
    let err = whet_model::io::hub::resolve_hub("whet-test/absent").unwrap_err().to_string();
    assert_eq!(
        err,
        "model `whet-test/absent`: `config.json` is not in the hub cache and HF_HUB_OFFLINE is set"
    );
}

/// Qwen2: q/k/v carry biases (loaded from the checkpoint and used), o_proj does not.
#[test]
fn qwen2_loads_and_uses_qkv_biases() {
    let mut cfg = preset("tiny").unwrap();
    cfg.arch = whet_model::Arch::Qwen2;
    cfg.qkv_bias = true;
    let mut tensors = random_weights(&cfg, DType::F32, &Device::Cpu, 4).unwrap();
    assert!(tensors.contains_key("model.layers.0.self_attn.q_proj.bias"));
    assert!(!tensors.contains_key("model.layers.0.self_attn.o_proj.bias"));
    let tok = whet_model::ModelTokenizer::byte_level().unwrap();
    let run = |tensors: &std::collections::HashMap<String, Tensor>| {
        let dir = tempfile::tempdir().unwrap();
        whet_model::io::export::save_hf_dir(dir.path(), &cfg, tensors, &tok, 1).unwrap();
        let m = load(&ModelSource::HfDir(dir.path().into()), DType::F32, &Device::Cpu, 0).unwrap();
        assert_eq!(m.config.arch, whet_model::Arch::Qwen2);
        let ids = Tensor::new(&[[3u32, 80, 81, 200]], &Device::Cpu).unwrap();
        m.model.forward_last(&ids, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let with_bias = run(&tensors);
    let b = tensors["model.layers.0.self_attn.v_proj.bias"].clone();
    tensors.insert("model.layers.0.self_attn.v_proj.bias".into(), (b + 1.0).unwrap());
    assert_ne!(run(&tensors), with_bias, "the v bias reaches the output");
}
