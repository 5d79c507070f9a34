//! Dataset preparation: the SmolLM2 golden render and hand-checked masks, packing equivalence,
//! `whet data check | preview | prepare` on every format, and bad data.

use crate::*;
use candle_core::{DType, Device, Tensor, D};
use std::path::Path;
use whet_data::{Example, Renderer, Role, TrainOn, Turn};
use whet_model::{load_tokenizer, ModelSource, ModelTokenizer};

fn smollm2() -> Option<ModelTokenizer> {
    have_default_model().then(|| {
        load_tokenizer(&ModelSource::Gguf(root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")))
            .unwrap()
    })
}

fn renderer<'a>(
    tok: &'a ModelTokenizer,
    template: &'a whet_data::ChatTemplate,
    train_on: TrainOn,
) -> Renderer<'a> {
    let eot = tok.stop_ids.iter().filter_map(|id| tok.tokenizer.id_to_token(*id)).collect();
    Renderer::new(&tok.tokenizer, template, train_on, eot)
}

/// The text of each run of trained tokens.
fn trained_spans(tok: &ModelTokenizer, t: &whet_data::Tokenized) -> Vec<String> {
    let mut spans = vec![];
    let mut run = vec![];
    for (id, m) in t.ids.iter().zip(&t.mask) {
        if *m == 1 {
            run.push(*id);
        } else if !run.is_empty() {
            spans.push(tok.decode(&run).unwrap());
            run.clear();
        }
    }
    if !run.is_empty() {
        spans.push(tok.decode(&run).unwrap());
    }
    spans
}

fn chat(turns: &[(&str, &str)]) -> Example {
    let role = |r: &str| match r {
        "system" => Role::System,
        "user" => Role::User,
        _ => Role::Assistant,
    };
    Example::Chat(
        turns
            .iter()
            .map(|(r, c)| Turn { role: role(r), content: c.to_string(), train: None })
            .collect(),
    )
}

/// Rendered text and ids equal transformers' `apply_chat_template` (scripts/reference.py,
/// data_golden.json); the masks are checked by hand: each assistant turn and its `<|im_end|>`,
/// never the newline the template writes after it, never the prompt.
#[test]
fn smollm2_render_equals_transformers_and_masks_are_the_hand_checked_ones() {
    let Some(tok) = smollm2() else { return };
    let template = whet_infer::chat_template(&tok).unwrap();
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/data_golden.json")).unwrap(),
    )
    .unwrap();
    let want_spans: [&[&str]; 3] = [
        &["Hello! How can I help?<|im_end|>", "Bye.<|im_end|>"],
        &["order_status<|im_end|>"],
        &["- one\n- two\n\n<|im_end|>"],
    ];
    let r = renderer(&tok, &template, TrainOn::All);
    for (case, want) in golden["cases"].as_array().unwrap().iter().zip(want_spans) {
        let turns: Vec<(String, String)> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap().to_string(),
                    m["content"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let turns: Vec<(&str, &str)> =
            turns.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let enc = r.encode(&chat(&turns)).unwrap();
        assert_eq!(enc.text, case["rendered"].as_str().unwrap());
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(enc.tokens.ids, ids);
        assert_eq!(trained_spans(&tok, &enc.tokens), want);
    }
    // --train-on last, per-message "train": false, and --train-on inputs.
    let conv = chat(&[
        ("user", "Hi!"),
        ("assistant", "Hello!"),
        ("user", "Say bye."),
        ("assistant", "Bye."),
    ]);
    let last = renderer(&tok, &template, TrainOn::Last).tokenize(&conv).unwrap();
    assert_eq!(trained_spans(&tok, &last), ["Bye.<|im_end|>"]);
    let Example::Chat(mut turns) = conv.clone() else { unreachable!() };
    turns[3].train = Some(false);
    let flagged = r.tokenize(&Example::Chat(turns)).unwrap();
    assert_eq!(trained_spans(&tok, &flagged), ["Hello!<|im_end|>"]);
    let all = renderer(&tok, &template, TrainOn::Inputs).tokenize(&conv).unwrap();
    assert!(all.mask.iter().all(|m| *m == 1));
    // Prompt/completion trains the completion only; plain text trains all of it plus EOS.
    let pc =
        r.tokenize(&Example::Completion { prompt: "2+2?".into(), completion: "4".into() }).unwrap();
    assert_eq!(trained_spans(&tok, &pc), ["4<|im_end|>"]);
    let text = r.tokenize(&Example::Text("Plain words.".into())).unwrap();
    assert_eq!(trained_spans(&tok, &text), ["Plain words.<|im_end|>"]);
}

/// Mean cross-entropy over trained tokens: token t is predicted from the tokens before it.
fn masked_loss(logits: &Tensor, ids: &[u32], mask: &[u8]) -> f32 {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1).unwrap().to_vec2::<f32>().unwrap();
    let (mut sum, mut n) = (0f32, 0usize);
    for t in 1..ids.len() {
        if mask[t] == 1 {
            sum -= logp[t - 1][ids[t] as usize];
            n += 1;
        }
    }
    sum / n as f32
}

/// Packing must not change what is learned: the loss of every example in a packed row (with
/// per-example positions and block-diagonal attention) equals its loss run alone.
#[test]
fn packed_rows_give_the_same_loss_as_unpacked_examples() {
    let m =
        whet_model::load(&ModelSource::Random("tiny".into()), DType::F32, &Device::Cpu, 9).unwrap();
    let examples: Vec<whet_data::Tokenized> = [(7usize, 3u32), (12, 40), (5, 90), (9, 150)]
        .iter()
        .map(|&(n, base)| whet_data::Tokenized {
            ids: (0..n as u32).map(|i| (base + i * 7) % 300).collect(),
            mask: (0..n).map(|i| u8::from(i >= n / 2)).collect(),
            ..Default::default()
        })
        .collect();
    let rows = whet_data::pack::pack(&examples, 20);
    assert!(rows.len() < examples.len(), "something was packed together");
    for row in &rows {
        let t = row.ids.len();
        let ids = Tensor::from_vec(row.ids.clone(), (1, t), &Device::Cpu).unwrap();
        let pos = Tensor::from_vec(row.positions.clone(), (1, t), &Device::Cpu).unwrap();
        let seg = Tensor::from_vec(row.segments.clone(), (1, t), &Device::Cpu).unwrap();
        let logits = m
            .model
            .forward_packed(&ids, whet_model::Packing { positions: &pos, segments: &seg })
            .unwrap()
            .squeeze(0)
            .unwrap();
        let mut start = 0;
        for &e in &row.examples {
            let ex = &examples[e];
            let n = ex.ids.len();
            let packed = masked_loss(&logits.narrow(0, start, n).unwrap(), &ex.ids, &ex.mask);
            let alone_ids = Tensor::from_vec(ex.ids.clone(), (1, n), &Device::Cpu).unwrap();
            let alone = m.model.forward(&alone_ids, None).unwrap().squeeze(0).unwrap();
            let alone = masked_loss(&alone, &ex.ids, &ex.mask);
            assert!((packed - alone).abs() < 1e-5, "example {e}: packed {packed} vs alone {alone}");
            start += n;
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn check_preview_and_prepare_work_on_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let files = [
        (
            "chat.jsonl",
            r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello."}]}"#,
        ),
        ("completion.jsonl", r#"{"prompt":"2+2=","completion":"4"}"#),
        ("text.jsonl", r#"{"text":"Some plain text."}"#),
        ("alpaca.jsonl", r#"{"instruction":"Add","input":"1 2","output":"3"}"#),
        (
            "sharegpt.jsonl",
            r#"{"conversations":[{"from":"human","value":"Hi"},{"from":"gpt","value":"Hello."}]}"#,
        ),
    ];
    for (name, line) in files {
        let path = write(dir.path(), name, &format!("{line}\n{line}\n"));
        let o =
            whet(&["data", "check", &path, "--model", "random:tiny", "--valid-fraction", "0"], "");
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(stdout(&o).contains("train ("), "{name}: {}", stdout(&o));
        assert!(stdout(&o).contains("duplicates: 1 (line 2 = line 1)"), "{name}: {}", stdout(&o));
        let o = whet(
            &[
                "data",
                "preview",
                &path,
                "--model",
                "random:tiny",
                "-n",
                "1",
                "--valid-fraction",
                "0",
            ],
            "",
        );
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(stdout(&o).contains('«'), "{name}: trained text is marked: {}", stdout(&o));
        let out = dir.path().join(format!("{name}.prepared"));
        let o = whet(
            &["data", "prepare", &path, "--model", "random:tiny", "--out", out.to_str().unwrap()],
            "",
        );
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(out.join("manifest.json").exists() && out.join("train.safetensors").exists());
    }
}

#[test]
fn the_example_datasets_check_clean_and_prepare() {
    if !have_default_model() {
        return;
    }
    for name in ["support-style", "intents"] {
        let path = root().join("data").join(name);
        let o = whet(&["data", "check", path.to_str().unwrap()], "");
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        for split in ["train (", "valid (", "test ("] {
            assert!(stdout(&o).contains(split), "{name}: {}", stdout(&o));
        }
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("p");
        let o = whet(
            &[
                "data",
                "prepare",
                path.to_str().unwrap(),
                "--out",
                dest.to_str().unwrap(),
                "--pack",
                "--max-seq-len",
                "512",
            ],
            "",
        );
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(stdout(&o).contains("% filled"), "{}", stdout(&o));
        // The cache reads back with the same tokenizer and template, and refuses another one.
        let tok = smollm2().unwrap();
        let tok_sha =
            whet_data::cache::sha256_hex(tok.tokenizer.to_string(false).unwrap().as_bytes());
        let tmpl_sha =
            whet_data::cache::sha256_hex(tok.chat_template.as_deref().unwrap().as_bytes());
        let (manifest, splits) = whet_data::cache::load(&dest, &tok_sha, &tmpl_sha).unwrap();
        assert_eq!(manifest.splits.len(), 3);
        assert_eq!(splits[0].1.len(), manifest.splits[0].examples);
        let err = whet_data::cache::load(&dest, "0000", &tmpl_sha).unwrap_err().to_string();
        assert!(err.contains("prepared with a different tokenizer"), "{err}");
    }
}

/// Every kind of bad record: `path:line:` errors, all of them (up to the limit), exit 1, and
/// no output directory left behind.
#[test]
fn bad_data_is_reported_by_line_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        r#"{"messages":[{"role":"user","content":"ok"},{"role":"assistant","content":"fine"}]}"#,
        r#"{"messages":[{"role":"user","content":"broken"#,
        r#"{"messages":[{"role":"robot","content":"x"},{"role":"assistant","content":"y"}]}"#,
        r#"{"messages":[{"role":"user","content":""},{"role":"assistant","content":"y"}]}"#,
        r#"{"messages":[{"role":"user","content":"only a question"}]}"#,
        r#"{"messages":[{"role":"user","content":42},{"role":"assistant","content":"y"}]}"#,
        r#"{"prompt":"mixed","completion":"formats"}"#,
    ];
    let path = write(dir.path(), "train.jsonl", &(lines.join("\n") + "\n"));
    let out = dir.path().join("out");
    let o = whet(
        &["data", "prepare", &path, "--model", "random:tiny", "--out", out.to_str().unwrap()],
        "",
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    for (line, what) in [
        (2, "invalid JSON"),
        (3, "unknown role `robot`"),
        (4, "field `messages[0].content` is empty"),
        (5, "conversation has no assistant turn"),
        (6, "field `messages[0].content` must be a string, got a number"),
        (7, "a `completion` record, but line 1 is `chat`"),
    ] {
        assert!(err.contains(&format!("error: {path}:{line}: {what}")), "line {line}: {err}");
    }
    assert!(err.contains("error: 6 problem(s) in the data; nothing was written"), "{err}");
    assert!(!err.contains("panicked"));
    assert!(!out.exists(), "no partial output");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary directory left");
    let o = whet(&["data", "check", &path, "--model", "random:tiny"], "");
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn empty_and_non_utf8_files_and_missing_train() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(dir.path(), "empty.jsonl", "");
    let o = whet(&["data", "check", &empty, "--model", "random:tiny"], "");
    assert!(
        stderr(&o).contains(&format!("error: {empty}: the file holds no records")),
        "{}",
        stderr(&o)
    );
    let latin1 = dir.path().join("latin1.jsonl");
    std::fs::write(&latin1, b"{\"text\":\"ok\"}\n{\"text\":\"caf\xe9\"}\n").unwrap();
    let o = whet(&["data", "check", latin1.to_str().unwrap(), "--model", "random:tiny"], "");
    assert!(stderr(&o).contains(":2: invalid UTF-8 (byte 0xe9 at column 13)"), "{}", stderr(&o));
    let sub = dir.path().join("set");
    std::fs::create_dir(&sub).unwrap();
    let o = whet(&["data", "check", sub.to_str().unwrap(), "--model", "random:tiny"], "");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no `train.jsonl` in this directory"), "{}", stderr(&o));
}

#[test]
fn prepare_refuses_to_overwrite_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "t.jsonl", "{\"text\":\"a b c\"}\n{\"text\":\"d e f\"}\n");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = whet(
        &["data", "prepare", &path, "--model", "random:tiny", "--out", out.to_str().unwrap()],
        "",
    );
    assert!(assert_one_line_error(&o).contains("already exists"));
    assert!(out.join("keep.txt").exists());
}
