//! The batched engine against PEFT's own greedy outputs (`scripts/reference_adapters.py`) and
//! against one-at-a-time generation.

use super::{root, tiny};
use candle_core::{DType, Device};
use whet_infer::{
    generate_all, Engine, EngineConfig, Event, GenerateConfig, Request, SamplingConfig, Session,
    StopReason,
};
use whet_model::{load, LoadedModel, ModelSource};

/// The tiny Llama 3 fixture with PEFT's `patterns`, `regex` and `layers` adapters as named
/// adapters.
fn with_adapters() -> LoadedModel {
    let base = root().join("tests/fixtures/families/llama3");
    let mut m = load(&ModelSource::HfDir(base), DType::F32, &Device::Cpu, 0).unwrap();
    for name in ["patterns", "regex", "layers"] {
        let dir = root().join("tests/fixtures/adapters").join(name);
        whet_model::adapter::load_named_adapter(&mut m.model, name, 1.0, &dir).unwrap();
    }
    // Named adapters apply only where a request asks for them.
    m.model.set_adapter_weights(&[]).unwrap();
    m
}

fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(root().join("tests/fixtures/adapters/golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn greedy(max_tokens: usize) -> GenerateConfig {
    GenerateConfig { max_tokens, stop_at_eos: false, ..Default::default() }
}

fn request(prompt: &[u32], cfg: GenerateConfig, adapter: Option<&str>) -> Request {
    Request {
        prompt: prompt.to_vec(),
        config: cfg,
        adapters: adapter.map(|a| vec![(a.to_string(), 1.0)]).unwrap_or_default(),
    }
}

#[test]
fn a_mixed_adapter_batch_generates_what_peft_generates() {
    let m = with_adapters();
    let g = golden();
    let ids: Vec<u32> = serde_json::from_value(g["ids"].clone()).unwrap();
    let base = Session::new(&m.model, &m.tokenizer).generate(&ids, &greedy(8), |_| {}).unwrap();
    let families: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/families/golden.json")).unwrap(),
    )
    .unwrap();
    let want: Vec<u32> =
        serde_json::from_value(families["families"]["llama3"]["greedy"].clone()).unwrap();
    assert_eq!(base.ids, want, "transformers' greedy tokens of the base");
    let short = &ids[..5];
    let base_short =
        Session::new(&m.model, &m.tokenizer).generate(short, &greedy(3), |_| {}).unwrap();
    // Interleaved so that the engine has to group the rows by adapter itself, with a ragged
    // mix of prompt lengths and lengths of answer.
    let names = [None, Some("patterns"), Some("regex"), None, Some("layers"), Some("patterns")];
    let reqs: Vec<Request> = names
        .iter()
        .enumerate()
        .map(|(i, a)| match i {
            3 => request(short, greedy(3), None),
            _ => request(&ids, greedy(8), *a),
        })
        .collect();
    for max_batch in [16, 2] {
        let cfg = EngineConfig { max_batch, prefill_chunk: 5 };
        let out = generate_all(&m.model, &m.tokenizer, reqs.clone(), cfg);
        for (i, (name, got)) in names.iter().zip(out).enumerate() {
            let got = got.unwrap();
            let want: Vec<u32> = match (i, name) {
                (3, _) => base_short.ids.clone(),
                (_, None) => base.ids.clone(),
                (_, Some(a)) => serde_json::from_value(g["adapters"][a]["greedy"].clone()).unwrap(),
            };
            assert_eq!(got.ids, want, "row {i} ({name:?}), batch of {max_batch}");
            assert_eq!(got.stop_reason, StopReason::MaxTokens);
            assert_eq!(got.prefill_tokens, reqs[i].prompt.len());
        }
    }
}

#[test]
fn each_row_keeps_its_own_sampling_and_stop_conditions() {
    let m = tiny();
    let prompt = m.tokenizer.encode("hello there").unwrap();
    let sampled = |seed| GenerateConfig {
        max_tokens: 12,
        stop_at_eos: false,
        sampling: SamplingConfig { temperature: 1.0, seed, ..Default::default() },
        ..Default::default()
    };
    let alone: Vec<_> = [1, 2]
        .iter()
        .map(|s| Session::new(&m.model, &m.tokenizer).generate(&prompt, &sampled(*s), |_| {}))
        .map(|g| g.unwrap())
        .collect();
    assert_ne!(alone[0].ids, alone[1].ids, "two seeds, two texts");
    // A stop string taken from the greedy text ends that row early, and only that one.
    let full = Session::new(&m.model, &m.tokenizer).generate(&prompt, &greedy(12), |_| {}).unwrap();
    let stop: String = full.text.chars().skip(3).take(2).collect();
    let stopped = GenerateConfig { stop: vec![stop.clone()], ..greedy(12) };
    let reqs = vec![
        request(&prompt, sampled(1), None),
        request(&prompt, stopped, None),
        request(&prompt, sampled(2), None),
        request(&prompt, greedy(4), None),
    ];
    let out: Vec<_> = generate_all(&m.model, &m.tokenizer, reqs, EngineConfig::default())
        .into_iter()
        .map(|g| g.unwrap())
        .collect();
    assert_eq!(out[0].ids, alone[0].ids);
    assert_eq!(out[2].ids, alone[1].ids);
    assert_eq!(out[1].stop_reason, StopReason::StopString);
    assert_eq!(out[1].text, full.text[..full.text.find(&stop).unwrap()]);
    assert_eq!(out[3].ids, full.ids[..4]);
}

#[test]
fn forks_of_one_prompt_equal_separate_requests() {
    let m = tiny();
    let prompt = m.tokenizer.encode("fork me").unwrap();
    let sampled = |seed| GenerateConfig {
        max_tokens: 10,
        stop_at_eos: false,
        sampling: SamplingConfig { temperature: 1.0, seed, ..Default::default() },
        ..Default::default()
    };
    let configs = vec![greedy(10), sampled(3), sampled(4)];
    let separate = generate_all(
        &m.model,
        &m.tokenizer,
        configs.iter().map(|c| request(&prompt, c.clone(), None)).collect(),
        EngineConfig::default(),
    );
    let forked = whet_infer::generate_forks(
        &m.model,
        &m.tokenizer,
        vec![(prompt.clone(), vec![], configs)],
        EngineConfig::default(),
    );
    assert_eq!(forked.len(), 1);
    for (a, b) in separate.into_iter().zip(forked.into_iter().next().unwrap()) {
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.ids, b.ids);
        assert_eq!(b.prefill_tokens, prompt.len());
    }
}

#[test]
fn a_cancelled_sequence_leaves_and_the_others_finish() {
    let m = tiny();
    let prompt = m.tokenizer.encode("one two").unwrap();
    let mut engine = Engine::new(EngineConfig::default());
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..3 {
        let tx = tx.clone();
        let mut texts = 0;
        let sink = Box::new(move |e: Event| {
            if let Event::Text(_) = e {
                texts += 1;
                // Row 1 hangs up after its second piece of text.
                if i == 1 && texts == 2 {
                    return false;
                }
            }
            if let Event::Done(g) = e {
                tx.send((i, g.ids.len())).unwrap();
            }
            true
        });
        engine.submit(&m.model, request(&prompt, greedy(20), None), sink).unwrap();
    }
    engine.step(&m.model, &m.tokenizer);
    assert_eq!(engine.len(), 3);
    for _ in 0..4 {
        engine.step(&m.model, &m.tokenizer);
    }
    assert_eq!(engine.len(), 2, "the cancelled row left the batch");
    engine.run(&m.model, &m.tokenizer);
    drop(tx);
    let mut done: Vec<_> = rx.iter().collect();
    done.sort();
    assert_eq!(done, vec![(0, 20), (2, 20)]);
}

#[test]
fn a_receiver_gone_during_a_long_prefill_stops_it_at_the_next_chunk() {
    let m = tiny();
    let prompt: Vec<u32> = (0..100).map(|i| 10 + i % 50).collect();
    let mut engine = Engine::new(EngineConfig { max_batch: 4, prefill_chunk: 16 });
    let (tx, rx) = std::sync::mpsc::channel();
    // The client hangs up once 32 of the 100 prompt tokens are in; one waiting in the
    // queue is gone before it is admitted; a third one stays.
    for (i, hang_up_at) in [(0, Some(32)), (1, Some(0)), (2, None)] {
        let tx = tx.clone();
        let sink = Box::new(move |e: Event| match e {
            Event::Progress { prefilled, of, .. } => {
                tx.send((i, prefilled, of)).unwrap();
                hang_up_at.is_none_or(|at| prefilled < at)
            }
            _ => true,
        });
        engine.submit(&m.model, request(&prompt, greedy(2), None), sink).unwrap();
    }
    engine.step(&m.model, &m.tokenizer);
    assert_eq!(engine.len(), 2, "the one gone before admission never ran");
    engine.step(&m.model, &m.tokenizer);
    assert_eq!(engine.len(), 1, "the prefill stopped at 32 of 100 tokens");
    engine.run(&m.model, &m.tokenizer);
    drop(tx);
    let seen: Vec<_> = rx.iter().filter(|(i, ..)| *i == 0).map(|(_, d, _)| d).collect();
    assert_eq!(seen, vec![0, 16, 32], "row 0 was asked at admission and between chunks");
}

#[test]
fn requests_the_model_cannot_run_are_refused_before_they_join() {
    let m = tiny();
    let mut engine = Engine::new(EngineConfig::default());
    let sink = || Box::new(|_: Event| true);
    let e = engine.submit(&m.model, request(&[], greedy(4), None), sink()).unwrap_err();
    assert!(e.to_string().contains("the prompt is empty"), "{e}");
    let e = engine.submit(&m.model, request(&[1, 2], greedy(4), Some("nope")), sink()).unwrap_err();
    assert!(e.to_string().contains("no adapter named `nope`; loaded: none"), "{e}");
    let long = vec![1u32; m.model.config().max_position_embeddings];
    let e = engine.submit(&m.model, request(&long, greedy(4), None), sink()).unwrap_err();
    assert!(e.to_string().contains("context"), "{e}");
    assert!(engine.is_empty());
}

#[test]
fn removing_an_adapter_fails_only_its_sequences() {
    let mut m = with_adapters();
    let ids: Vec<u32> = serde_json::from_value(golden()["ids"].clone()).unwrap();
    let mut engine = Engine::new(EngineConfig::default());
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, a) in [Some("regex"), None].into_iter().enumerate() {
        let tx = tx.clone();
        let sink = Box::new(move |e: Event| {
            match e {
                Event::Done(_) => tx.send((i, "done".to_string())).unwrap(),
                Event::Failed(m) => tx.send((i, m)).unwrap(),
                Event::Text(_) | Event::Progress { .. } => {}
            }
            true
        });
        engine.submit(&m.model, request(&ids, greedy(6), a), sink).unwrap();
    }
    engine.step(&m.model, &m.tokenizer);
    engine.fail_adapter("regex");
    m.model.remove_named_lora("regex").unwrap();
    engine.run(&m.model, &m.tokenizer);
    drop(tx);
    let got: Vec<_> = rx.iter().collect();
    assert_eq!(got, vec![(0, "adapter `regex` was unloaded".to_string()), (1, "done".into())]);
    assert_eq!(m.model.adapter_names(), ["patterns", "layers"]);
}
