//! Bad input at the command line: one-line errors, exit code 1, never a panic.

use crate::*;

#[test]
fn missing_model_file() {
    let o = whet(&["generate", "--model", "no/such/model.gguf", "--prompt", "hi"], "");
    let err = assert_one_line_error(&o);
    assert_eq!(
        err,
        "error: cannot load model `no/such/model.gguf`: no/such/model.gguf: file not found"
    );
}

#[test]
fn default_model_absent_names_the_fetch_command() {
    let dir = tempfile::tempdir().unwrap();
    let o = whet_in(dir.path(), &["generate", "--prompt", "hi"], "", &[]);
    assert_one_line_error(&o);
    assert!(stderr(&o).contains("hint: fetch it with `scripts/fetch-model.sh`"), "{}", stderr(&o));
}

#[test]
fn corrupt_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let o = whet(&["info", path.to_str().unwrap()], "");
    let err = assert_one_line_error(&o);
    assert!(err.contains(&format!("{}: ", path.display())), "{err}");
}

#[test]
fn unsupported_architecture() {
    let dir = tiny_hf_dir(None);
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"llama\"", "\"mamba\"");
    std::fs::write(&cfg, text).unwrap();
    let o = whet(&["info", dir.path().to_str().unwrap()], "");
    let err = assert_one_line_error(&o);
    assert!(
        err.ends_with(&format!(
            "{}: unsupported architecture `mamba`; whet supports `llama`, `mistral`, `qwen2`, `qwen3`",
            cfg.display()
        )),
        "{err}"
    );
}

#[test]
fn template_that_fails_to_render() {
    let dir = tiny_hf_dir(Some("{{ raise_exception('Conversation roles must alternate') }}"));
    let o = whet(
        &["generate", "--model", dir.path().to_str().unwrap(), "--chat", "--prompt", "hi"],
        "",
    );
    let err = assert_one_line_error(&o);
    // The file the template came from (it once said tokenizer.json).
    let tok = dir.path().join("tokenizer_config.json");
    assert!(
        err.contains(&format!(
            "{}: chat template failed to render: Conversation roles must alternate",
            tok.display()
        )),
        "{err}"
    );
}

#[test]
fn template_that_does_not_compile() {
    let dir = tiny_hf_dir(Some("{% for m in messages %}{{ m.content }"));
    let o = whet(
        &["generate", "--model", dir.path().to_str().unwrap(), "--chat", "--prompt", "hi"],
        "",
    );
    let err = assert_one_line_error(&o);
    assert!(err.contains("chat template does not compile"), "{err}");
}

#[test]
fn unknown_device_and_dtype() {
    // Typed flags: refused while the command line is parsed, as a usage error (exit 2).
    let o = whet(&["generate", "--model", "random:tiny", "--device", "tpu", "--prompt", "hi"], "");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("invalid value 'tpu' for '--device <DEVICE>': unknown device `tpu`"),
        "{err}"
    );
    let o = whet(&["generate", "--model", "random:tiny", "--dtype", "f8", "--prompt", "hi"], "");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("invalid value 'f8' for '--dtype <DTYPE>'"), "{err}");
    assert!(err.contains("[possible values: f32, f16, bf16]"), "{err}");
    let o = whet(&["generate", "--model", "random:tiny", "--quantize", "q5", "--prompt", "hi"], "");
    assert!(stderr(&o).contains("[possible values: q8_0, q4_0]"), "{}", stderr(&o));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_requested_without_cuda_support() {
    let o = whet(&["generate", "--model", "random:tiny", "--device", "cuda", "--prompt", "hi"], "");
    let err = assert_one_line_error(&o);
    assert!(err.contains("built without CUDA support"), "{err}");
}

#[test]
fn bad_sampling_values() {
    let o = whet(&["generate", "--model", "random:tiny", "--top-p", "1.5", "--prompt", "hi"], "");
    assert!(assert_one_line_error(&o).contains("--top-p must be in (0, 1], got `1.5`"));
}
