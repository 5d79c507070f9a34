//! whet-infer integration tests: generation against the PyTorch golden files, sampling and stops.

use candle_core::{DType, Device};
use std::path::PathBuf;
use std::sync::OnceLock;
use whet_infer::{chat_template, GenerateConfig, Message, SamplingConfig, Session, StopReason};
use whet_model::{load, LoadedModel, ModelSource};

mod engine;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The default model, loaded once for all tests; `None` when not fetched (see whet-model's tests).
fn default_model() -> Option<&'static LoadedModel> {
    static MODEL: OnceLock<Option<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = root().join(whet_model::DEFAULT_MODEL);
            if !path.exists() {
                if std::env::var("WHET_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
                    panic!(
                        "{} is missing and WHET_REQUIRE_MODEL=1; run scripts/fetch-model.sh",
                        path.display()
                    );
                }
                eprintln!("SKIPPED: {} not fetched; run scripts/fetch-model.sh", path.display());
                return None;
            }
            Some(load(&ModelSource::Gguf(path), DType::F32, &Device::Cpu, 0).unwrap())
        })
        .as_ref()
}

fn tiny() -> LoadedModel {
    load(&ModelSource::Random("tiny".into()), DType::F32, &Device::Cpu, 5).unwrap()
}

fn golden_cases() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(root().join("tests/fixtures/chat_golden.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn messages(case: &serde_json::Value) -> Vec<Message> {
    serde_json::from_value(case["messages"].clone()).unwrap()
}

/// `scripts/reference.py`: transformers' `apply_chat_template` on the same GGUF's template.
#[test]
fn chat_template_renders_like_transformers() {
    let Some(m) = default_model() else { return };
    let template = chat_template(&m.tokenizer).unwrap();
    assert!(!template.is_fallback());
    for case in golden_cases() {
        let text = template.render(&messages(&case), true).unwrap();
        assert_eq!(text, case["rendered"].as_str().unwrap());
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(m.tokenizer.encode(&text).unwrap(), ids);
    }
}

/// `scripts/reference.py`: 24 greedy tokens from transformers' `generate(do_sample=False)`.
#[test]
fn greedy_continuation_equals_transformers_for_24_tokens() {
    let Some(m) = default_model() else { return };
    for case in golden_cases() {
        let prompt: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["greedy_ids"].clone()).unwrap();
        assert_eq!(want.len(), 24);
        let cfg = GenerateConfig { max_tokens: 24, stop_at_eos: false, ..Default::default() };
        let g = Session::new(&m.model, &m.tokenizer).generate(&prompt, &cfg, |_| {}).unwrap();
        assert_eq!(g.ids, want, "for {:?}", case["messages"]);
    }
}

#[test]
fn the_capital_of_france_is_paris() {
    let Some(m) = default_model() else { return };
    let template = chat_template(&m.tokenizer).unwrap();
    let prompt =
        template.render(&[Message::new("user", "What is the capital of France?")], true).unwrap();
    let ids = m.tokenizer.encode(&prompt).unwrap();
    let mut streamed = String::new();
    let g = Session::new(&m.model, &m.tokenizer)
        .generate(&ids, &GenerateConfig::default(), |t| streamed.push_str(t))
        .unwrap();
    assert!(g.text.contains("Paris"), "{}", g.text);
    assert_eq!(g.stop_reason, StopReason::Eos, "stops at <|im_end|>");
    assert_eq!(streamed, g.text);
}

#[test]
fn stop_strings_cut_the_text_and_streaming_never_shows_them() {
    let m = tiny();
    let prompt = m.tokenizer.encode("abc").unwrap();
    let cfg = GenerateConfig { max_tokens: 40, stop_at_eos: false, ..Default::default() };
    let full = Session::new(&m.model, &m.tokenizer).generate(&prompt, &cfg, |_| {}).unwrap();
    assert_eq!(full.ids.len(), 40);
    assert_eq!(full.stop_reason, StopReason::MaxTokens);
    // Pick a stop string from the middle of what the model would say.
    let chars: Vec<char> = full.text.chars().collect();
    let stop: String = chars[10..13].iter().collect();
    let at = full.text.find(&stop).unwrap();
    let cfg = GenerateConfig { stop: vec![stop.clone()], ..cfg };
    let mut streamed = String::new();
    let g = Session::new(&m.model, &m.tokenizer)
        .generate(&prompt, &cfg, |t| streamed.push_str(t))
        .unwrap();
    assert_eq!(g.stop_reason, StopReason::StopString);
    assert_eq!(g.text, full.text[..at]);
    assert_eq!(streamed, g.text);
}

#[test]
fn sampling_is_reproducible_from_the_seed() {
    let m = tiny();
    let prompt = m.tokenizer.encode("hello").unwrap();
    let run = |seed| {
        let sampling = SamplingConfig {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.95,
            repetition_penalty: 1.1,
            seed,
            ..Default::default()
        };
        let cfg =
            GenerateConfig { max_tokens: 30, stop_at_eos: false, sampling, ..Default::default() };
        Session::new(&m.model, &m.tokenizer).generate(&prompt, &cfg, |_| {}).unwrap().ids
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn a_second_turn_reuses_the_cache_and_matches_a_fresh_session() {
    let m = tiny();
    let cfg = GenerateConfig { max_tokens: 8, stop_at_eos: false, ..Default::default() };
    let first = m.tokenizer.encode("first turn").unwrap();
    let mut session = Session::new(&m.model, &m.tokenizer);
    let g1 = session.generate(&first, &cfg, |_| {}).unwrap();
    let mut second = first.clone();
    second.extend(&g1.ids);
    second.extend(m.tokenizer.encode(" and more").unwrap());
    let g2 = session.generate(&second, &cfg, |_| {}).unwrap();
    assert!(
        g2.prefill_tokens < second.len(),
        "cache reused: {} of {}",
        g2.prefill_tokens,
        second.len()
    );
    let fresh = Session::new(&m.model, &m.tokenizer).generate(&second, &cfg, |_| {}).unwrap();
    assert_eq!(g2.ids, fresh.ids);
}
