//! The model's tokenizer and chat template: from `tokenizer.json` + `tokenizer_config.json`, from
//! a GGUF file's `tokenizer.ggml.*` metadata, or a byte-level tokenizer for random presets.

use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// A tokenizer with what generation and chat need around it.
#[derive(Clone)]
pub struct ModelTokenizer {
    /// The Hugging Face tokenizer.
    pub tokenizer: Tokenizer,
    /// Jinja chat template, when the model ships one.
    pub chat_template: Option<String>,
    /// The file the chat template was read from (`chat_template.jinja`,
    /// `tokenizer_config.json`, a GGUF file), for messages and `whet info`.
    pub template_source: String,
    /// Beginning-of-sequence token text, for templates that use `bos_token`.
    pub bos_token: Option<String>,
    /// End-of-sequence token text, for templates that use `eos_token`.
    pub eos_token: Option<String>,
    /// Ids that end generation: the model's EOS plus the usual end-of-turn tokens it knows.
    pub stop_ids: Vec<u32>,
    /// Where the tokenizer came from, for `whet info`.
    pub source: String,
}

/// End-of-turn tokens of common chat formats; generation stops on any the vocabulary has.
const END_OF_TURN: [&str; 5] = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>"];

impl ModelTokenizer {
    fn new(
        tokenizer: Tokenizer,
        chat_template: Option<String>,
        bos: Option<String>,
        eos: Option<String>,
        mut stop_ids: Vec<u32>,
        source: String,
    ) -> Self {
        for tok in eos.iter().map(String::as_str).chain(END_OF_TURN) {
            if let Some(id) = tokenizer.token_to_id(tok) {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        let template_source = source.clone();
        Self {
            tokenizer,
            chat_template,
            template_source,
            bos_token: bos,
            eos_token: eos,
            stop_ids,
            source,
        }
    }

    /// Load `tokenizer.json` and, when present, `tokenizer_config.json` from a model directory.
    pub fn from_dir(dir: &Path, config_eos: &[u32]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::NotFound { path });
        }
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| Error::tokenizer(&path, format!("not a valid tokenizer.json: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let (template, bos, eos) =
            if cfg_path.exists() { read_tokenizer_config(&cfg_path)? } else { (None, None, None) };
        // A special token the vocabulary lacks would never be produced (or stop generation).
        for (field, tok) in [("bos_token", &bos), ("eos_token", &eos)] {
            if let Some(t) = tok.as_deref().filter(|t| tokenizer.token_to_id(t).is_none()) {
                return Err(Error::tokenizer(
                    &cfg_path,
                    format!("`{field}` = `{t}` is not in tokenizer.json's vocabulary"),
                ));
            }
        }
        // transformers' current layout keeps the template in `chat_template.jinja`, which wins
        // over `tokenizer_config.json`'s `chat_template`, as it does in transformers.
        let jinja = dir.join("chat_template.jinja");
        let (template, template_source) = match std::fs::read_to_string(&jinja) {
            Ok(t) => (Some(t), jinja),
            Err(_) => (template, cfg_path),
        };
        let mut t = Self::new(
            tokenizer,
            template,
            bos,
            eos,
            config_eos.to_vec(),
            path.display().to_string(),
        );
        t.template_source = template_source.display().to_string();
        Ok(t)
    }

    /// Build the tokenizer from a GGUF file's metadata (see [`crate::io::gguf_vocab`]).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf
            .content
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| {
                Error::tokenizer(&gguf.path, "missing GGUF metadata key `tokenizer.ggml.model`")
            })?;
        let tokenizer = match model.as_str() {
            "gpt2" => crate::io::gguf_vocab::bpe_from_gguf(gguf)?,
            "llama" => crate::io::gguf_vocab::spm_from_gguf(gguf)?,
            other => {
                return Err(Error::tokenizer(
                    &gguf.path,
                    format!("unsupported tokenizer `tokenizer.ggml.model` = `{other}`; whet reads `gpt2` (byte-level BPE) and `llama` (SentencePiece)"),
                ))
            }
        };
        // A special-token id outside the vocabulary would leave generation without its stop.
        let token = |key: &str| -> Result<Option<String>> {
            let Some(id) = gguf.content.metadata.get(key).and_then(|v| v.to_u32().ok()) else {
                return Ok(None);
            };
            tokenizer.id_to_token(id).map(Some).ok_or_else(|| {
                Error::tokenizer(
                    &gguf.path,
                    format!(
                        "`{key}` = `{id}` is not in the vocabulary of {} tokens",
                        tokenizer.get_vocab_size(true)
                    ),
                )
            })
        };
        let bos = token("tokenizer.ggml.bos_token_id")?;
        let eos = token("tokenizer.ggml.eos_token_id")?;
        Ok(Self::new(
            tokenizer.clone(),
            gguf.chat_template(),
            bos,
            eos,
            vec![],
            format!("{} (GGUF metadata)", gguf.path.display()),
        ))
    }

    /// A byte-level tokenizer (256 byte tokens plus ChatML's special tokens) for random models.
    pub fn byte_level() -> Result<Self> {
        let json = byte_level_json();
        let tokenizer = Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| Error::tokenizer(PathBuf::from("<byte-level>"), e))?;
        Ok(Self::new(
            tokenizer,
            None,
            None,
            Some("<|endoftext|>".into()),
            vec![],
            "byte-level (built in)".into(),
        ))
    }

    /// Number of ids the tokenizer can produce, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Fail when the tokenizer can emit ids beyond the model's embedding rows.
    pub fn check_fits(&self, model_vocab: usize, path: &Path) -> Result<()> {
        let n = self.vocab_size();
        if n > model_vocab {
            return Err(Error::tokenizer(
                path,
                format!("tokenizer has {n} tokens but the model's vocabulary has only {model_vocab}; they do not belong together"),
            ));
        }
        Ok(())
    }

    /// Encode text without adding special tokens (chat templates add their own).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode_fast(text, false).map_err(|e| {
            Error::tokenizer(PathBuf::from(&self.source), format!("cannot encode text: {e}"))
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode ids to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, false).map_err(|e| {
            Error::tokenizer(PathBuf::from(&self.source), format!("cannot decode ids: {e}"))
        })
    }
}

/// `chat_template`, `bos_token` and `eos_token` from `tokenizer_config.json`.
fn read_tokenizer_config(path: &Path) -> Result<(Option<String>, Option<String>, Option<String>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::tokenizer(path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::tokenizer(path, format!("invalid JSON: {e}")))?;
    let token = |key: &str| match v.get(key) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    };
    // `chat_template` is a string, or a list of named templates of which "default" is the chat one.
    let template = match v.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(items)) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| items.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    };
    Ok((template, token("bos_token"), token("eos_token")))
}

/// `tokenizer.json` of a byte-level BPE without merges: every UTF-8 byte is a token.
fn byte_level_json() -> String {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut vocab = serde_json::Map::new();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    for (i, c) in alphabet.iter().enumerate() {
        vocab.insert(c.to_string(), (specials.len() + i).into());
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "vocab": vocab, "merges": [], "ignore_merges": false}
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_round_trips_any_text() {
        let t = ModelTokenizer::byte_level().unwrap();
        assert_eq!(t.vocab_size(), 259);
        let text = "héllo <|im_end|> 🙂";
        let ids = t.encode(text).unwrap();
        assert!(ids.contains(&2), "special token kept whole: {ids:?}");
        assert_eq!(t.decode(&ids).unwrap(), text);
        assert!(t.stop_ids.contains(&0) && t.stop_ids.contains(&2));
    }
}
