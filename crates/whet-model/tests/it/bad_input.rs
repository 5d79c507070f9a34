//! Bad input: every failure is one line naming the file and the problem, never a panic.

use crate::sources::write_tiny_hf_dir;
use candle_core::{DType, Device};
use std::path::Path;
use whet_model::{load, ModelSource};

fn load_err(source: ModelSource) -> String {
    match load(&source, DType::F32, &Device::Cpu, 0) {
        Ok(_) => panic!("{source:?} loaded"),
        Err(e) => {
            let msg = e.to_string();
            assert_eq!(msg.lines().count(), 1, "not one line: {msg}");
            msg
        }
    }
}

fn tiny_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf_dir(dir.path(), 1);
    dir
}

#[test]
fn missing_gguf_file() {
    let err = load_err(ModelSource::Gguf("does/not/exist.gguf".into()));
    assert_eq!(err, "does/not/exist.gguf: file not found");
}

#[test]
fn gguf_that_is_not_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.gguf");
    std::fs::write(&path, b"this is not a gguf file at all, just text").unwrap();
    let err = load_err(ModelSource::Gguf(path.clone()));
    assert!(err.starts_with(&format!("{}: not a readable GGUF file", path.display())), "{err}");
}

#[test]
fn truncated_gguf() {
    let Some(model) = crate::default_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    let bytes = std::fs::read(model).unwrap();
    for keep in [bytes.len() / 2, 4096, 10] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let err = load_err(ModelSource::Gguf(path.clone()));
        assert!(err.starts_with(&format!("{}: ", path.display())), "{err}");
        assert!(
            err.contains("truncated") || err.contains("not a readable GGUF"),
            "{keep} bytes: {err}"
        );
    }
}

#[test]
fn missing_config_json() {
    let dir = tiny_dir();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load_err(ModelSource::HfDir(dir.path().into()));
    assert_eq!(err, format!("{}: file not found", dir.path().join("config.json").display()));
}

#[test]
fn unsupported_architecture() {
    let dir = tiny_dir();
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace(r#""model_type": "llama""#, r#""model_type": "gpt2""#),
    )
    .unwrap();
    let err = load_err(ModelSource::HfDir(dir.path().into()));
    assert!(
        err.ends_with(
            "config.json: unsupported architecture `gpt2`; whet supports `llama`, `mistral`, `qwen2`, `qwen3`"
        ),
        "{err}"
    );
}

#[test]
fn config_that_is_not_json() {
    let dir = tiny_dir();
    std::fs::write(dir.path().join("config.json"), "{ hidden_size: 64").unwrap();
    let err = load_err(ModelSource::HfDir(dir.path().into()));
    assert!(err.contains("config.json: invalid model config"), "{err}");
}

#[test]
fn corrupt_and_truncated_safetensors() {
    let dir = tiny_dir();
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(ModelSource::HfDir(dir.path().into()));
    assert!(
        err.starts_with(&format!("{}: not a readable safetensors file", st.display())),
        "{err}"
    );
    std::fs::write(&st, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let err = load_err(ModelSource::HfDir(dir.path().into()));
    assert!(
        err.starts_with(&format!("{}: not a readable safetensors file", st.display())),
        "{err}"
    );
}

#[test]
fn safetensors_missing_a_tensor() {
    let dir = tiny_dir();
    let st = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    tensors.remove("model.layers.1.mlp.down_proj.weight");
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let err = load_err(ModelSource::HfDir(dir.path().into()));
    assert!(err.contains("model.layers.1.mlp.down_proj.weight"), "{err}");
}

#[test]
fn tokenizer_larger_than_the_vocabulary() {
    let dir = tiny_dir();
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace(r#""vocab_size": 320"#, r#""vocab_size": 200"#),
    )
    .unwrap();
    let err = load_err(ModelSource::HfDir(dir.path().into()));
    let tok = dir.path().join("tokenizer.json");
    assert_eq!(err, format!("{}: tokenizer has 259 tokens but the model's vocabulary has only 200; they do not belong together", tok.display()));
}

#[test]
fn tokenizer_json_that_is_broken() {
    let dir = tiny_dir();
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let err = load_err(ModelSource::HfDir(dir.path().into()));
    assert!(err.contains("tokenizer.json: not a valid tokenizer.json"), "{err}");
    assert!(Path::new(&dir.path().join("config.json")).exists());
}

/// Regression: a PEFT adapter with `r: 0` was reported as `--lora: rank must be at least 1`,
/// naming a flag the user never passed instead of the file.
#[test]
fn adapter_with_rank_zero_names_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 0, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"]}"#;
    std::fs::write(dir.path().join("adapter_config.json"), config).unwrap();
    let mut model =
        load(&ModelSource::Random("tiny".into()), DType::F32, &Device::Cpu, 0).unwrap().model;
    let err = whet_model::adapter::load_adapter(&mut model, dir.path()).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: `r` (rank) must be at least 1, got `0`",
            dir.path().join("adapter_config.json").display()
        )
    );
}

/// A GGUF tensor the model does not use (here Qwen3's q/k norms in a file that says `llama`)
/// would change the outputs if it were skipped: the load fails naming it. Regression: unknown
/// tensors, `rope_freqs.weight` among them, were skipped with a debug log.
#[test]
fn gguf_with_a_tensor_whet_does_not_know() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let path = edited_gguf("qwen3.gguf", dir.path(), "mislabelled.gguf", |k, v| {
        if k == "general.architecture" {
            *v = Value::String("llama".into());
        }
        if let Some(rest) = k.strip_prefix("qwen3.") {
            *k = format!("llama.{rest}");
        }
    });
    let err = load_err(ModelSource::Gguf(path.clone()));
    assert_eq!(
        err,
        format!(
            "{}: tensor `model.layers.0.self_attn.k_norm.weight` (4 unused in all) is not part of a `llama` model whet knows",
            path.display()
        )
    );
}

/// A special token the vocabulary lacks: `eos_token` in tokenizer_config.json, and a GGUF
/// `tokenizer.ggml.eos_token_id` past the end of its tokens. Either would leave generation
/// without its stop token, silently.
#[test]
fn special_tokens_missing_from_the_vocabulary() {
    let dir = tiny_dir();
    let cfg = dir.path().join("tokenizer_config.json");
    std::fs::write(&cfg, r#"{"eos_token": "<|eot_id|>"}"#).unwrap();
    let err = load_err(ModelSource::HfDir(dir.path().to_path_buf()));
    assert_eq!(
        err,
        format!(
            "{}: `eos_token` = `<|eot_id|>` is not in tokenizer.json's vocabulary",
            cfg.display()
        )
    );
    let tmp = tempfile::tempdir().unwrap();
    let path = edited_gguf("qwen2.gguf", tmp.path(), "bad-eos.gguf", |k, v| {
        if k == "tokenizer.ggml.eos_token_id" {
            *v = candle_core::quantized::gguf_file::Value::U32(5000);
        }
    });
    let err = load_err(ModelSource::Gguf(path.clone()));
    assert_eq!(
        err,
        format!(
            "{}: `tokenizer.ggml.eos_token_id` = `5000` is not in the vocabulary of 320 tokens",
            path.display()
        )
    );
}

/// A copy of the fixture GGUF `src` in `dir`/`name` with its metadata edited by `edit`.
fn edited_gguf(
    src: &str,
    dir: &Path,
    name: &str,
    edit: impl Fn(&mut String, &mut candle_core::quantized::gguf_file::Value),
) -> std::path::PathBuf {
    use candle_core::quantized::{gguf_file, QTensor};
    let src = crate::root().join("tests/fixtures/families").join(src);
    let mut f = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut metadata: Vec<(String, gguf_file::Value)> =
        content.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for (k, v) in metadata.iter_mut() {
        edit(k, v);
    }
    let tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|name| (name.clone(), content.tensor(&mut f, name, &Device::Cpu).unwrap()))
        .collect();
    let path = dir.join(name);
    let mut out = std::fs::File::create(&path).unwrap();
    let md: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut out, &md, &ts).unwrap();
    path
}

/// `adapter_config.json` is read into one typed struct: a field of the wrong type is an error
/// naming the field and its place in the file, for whet's own load and for every runtime's
/// check alike.
#[test]
fn adapter_config_fields_of_the_wrong_type_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut model =
        load(&ModelSource::Random("tiny".into()), DType::F32, &Device::Cpu, 0).unwrap().model;
    for (config, want) in [
        (
            r#"{"peft_type": "LORA", "r": "8", "target_modules": ["q_proj"]}"#,
            "`r`: invalid type: string \"8\", expected usize",
        ),
        (
            r#"{"peft_type": "LORA", "r": 8, "target_modules": 3}"#,
            "`target_modules`: expected a list of module names or a regular expression",
        ),
        (
            r#"{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "layers_to_transform": "x"}"#,
            "`layers_to_transform`: expected one value or a list of them",
        ),
        (
            r#"{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "use_rslora": "yes"}"#,
            "`use_rslora`: invalid type: string \"yes\", expected a boolean",
        ),
        (
            r#"{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": "x"}}"#,
            "`rank_pattern`.`q_proj` = `\"x\"`: expected a number",
        ),
        (r#"{"peft_type": "LORA", "target_modules": ["q_proj"]}"#, "`r` is missing"),
    ] {
        std::fs::write(dir.path().join("adapter_config.json"), config).unwrap();
        let err =
            whet_model::adapter::load_adapter(&mut model, dir.path()).unwrap_err().to_string();
        let path = dir.path().join("adapter_config.json");
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(err.contains(want), "{config}: {err}");
        // Every runtime's check reads the same struct: a field of the wrong type fails it too
        // (a value whet alone refuses, as the rank pattern's, is one of whet's findings).
        let check = whet_model::adapter::check_for(dir.path(), whet_model::adapter::Runtime::Vllm);
        match check {
            Err(e) => assert!(e.to_string().contains(want), "{e}"),
            Ok(_) => assert!(want.contains("= `") || want.contains("missing"), "{config}: checked"),
        }
    }
}
