//! Tokenizers from GGUF metadata, built as llama.cpp builds them (`src/llama-vocab.cpp`):
//! byte-level BPE (`tokenizer.ggml.model = gpt2`) with the pre-tokenizer that
//! `tokenizer.ggml.pre` names — the regular expressions llama.cpp applies one after another —
//! and SentencePiece (`llama`) with its scores, byte fallback and `▁`; control tokens are
//! matched whole. A pre-tokenizer whet does not know is refused by name:
//! guessing GPT-2's would tokenize numbers, spaces and non-English text differently from the
//! model's own tokenizer, without a word.
//!
//! Checked against llama.cpp's own test vectors (`models/ggml-vocab-*.gguf` with `.inp`/`.out`,
//! which Hugging Face `tokenizers` produced) in whet-model's `tokenizer_vectors` test.

use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// GPT-2's pattern.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's (case-insensitive contractions spelled out, numbers in runs of at most three).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's (single digits).
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen3.5's (marks join letters).
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^
\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[
]*|\s*[
]+|\s+(?!\S)|\s+";

/// How one `tokenizer.ggml.pre` value tokenizes: llama.cpp's regexes, in order, and the
/// options it sets with them.
struct Pre {
    regexes: &'static [&'static str],
    /// A word found whole in the vocabulary is one token (llama.cpp's `ignore_merges`).
    ignore_merges: bool,
    /// NFC-normalise first, as Qwen2's `tokenizer.json` does.
    nfc: bool,
}

/// llama.cpp's pre-tokenizer names and what each means (`llama_vocab::impl::load`).
fn pre_tokenizer(name: &str) -> Option<Pre> {
    let pre = |regexes, ignore_merges, nfc| Some(Pre { regexes, ignore_merges, nfc });
    match name {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => pre(&[LLAMA3], true, false),
        "dbrx" | "smaug-bpe" | "chatglm-bpe" => pre(&[LLAMA3], false, false),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => pre(&[QWEN2], false, true),
        "qwen35" => pre(&[QWEN35], false, false),
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "jina-es" | "jina-de"
        | "jina-v2-es" | "jina-v2-de" | "mellum" | "exaone4" => pre(&[GPT2], false, false),
        // Digits one by one, then GPT-2's pattern (SmolLM's `Digits` + `ByteLevel`).
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            pre(&[r"\p{N}", GPT2], false, false)
        }
        "falcon" => pre(
            &[
                r"[\p{P}\$\+<=>\^~\|`]+",
                r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                "[0-9][0-9][0-9]",
            ],
            false,
            false,
        ),
        "deepseek-coder" => {
            pre(&["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"], false, false)
        }
        "default" => {
            pre(&[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"], false, false)
        }
        _ => None,
    }
}

/// The names [`pre_tokenizer`] knows, for the error that refuses another.
const KNOWN_PRE: &str = "llama-bpe (llama3), qwen2, qwen35, gpt-2, smollm, starcoder, refact, command-r, falcon, deepseek-coder, mpt, olmo, dbrx, smaug-bpe, stablelm2, default";

/// A byte-level BPE tokenizer from `gguf`'s `tokenizer.ggml.*` metadata.
pub(crate) fn bpe_from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
    let path = &gguf.path;
    let meta = &gguf.content.metadata;
    let bad = |msg: String| Error::tokenizer(path, msg);
    let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
    let merges: Merges = strings(gguf, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| bad(format!("merge `{m}` is not two tokens")))
        })
        .collect::<Result<_>>()?;
    let pre_name = match meta.get("tokenizer.ggml.pre") {
        Some(v) => v.to_string().map_err(|e| bad(format!("`tokenizer.ggml.pre`: {e}")))?.clone(),
        None => "default".to_string(), // what llama.cpp assumes, with a warning
    };
    let pre = pre_tokenizer(&pre_name).ok_or_else(|| {
        bad(format!(
            "unsupported pre-tokenizer `tokenizer.ggml.pre` = `{pre_name}`; whet knows {KNOWN_PRE}"
        ))
    })?;
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| bad(format!("cannot build the BPE vocabulary: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let mut steps: Vec<PreTokenizerWrapper> = vec![];
    for re in pre.regexes {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| bad(format!("pre-tokenizer `{pre_name}`: {e}")))?;
        steps.push(split.into());
    }
    // The splits did the regex work; ByteLevel only maps bytes to its alphabet.
    steps.push(ByteLevel::new(false, false, false).into());
    tokenizer.with_pre_tokenizer(Some(Sequence::new(steps)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
    if pre.nfc {
        tokenizer.with_normalizer(Some(NFC)).map_err(|e| bad(e.to_string()))?;
    }
    add_special_tokens(&mut tokenizer, gguf, &tokens)?;
    Ok(tokenizer)
}

/// The list of strings under `key`.
fn strings(gguf: &GgufFile, key: &str) -> Result<Vec<String>> {
    let bad = |msg: String| Error::tokenizer(&gguf.path, msg);
    match gguf.content.metadata.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| bad(format!("`{key}`: {e}"))))
            .collect(),
        Some(_) => Err(bad(format!("`{key}` is not a list of strings"))),
        None => Err(bad(format!("missing GGUF metadata key `{key}`"))),
    }
}

/// A SentencePiece BPE tokenizer (`tokenizer.ggml.model = llama`: Llama 2, TinyLlama, Mistral,
/// Phi-3) from `gguf`'s tokens and scores, as transformers converts a SentencePiece model
/// (`LlamaConverter`, legacy): merges from the scores, byte fallback (`<0x0A>`), spaces as `▁`
/// with one prepended.
pub(crate) fn spm_from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
    use tokenizers::decoders::{
        byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as Decoders, strip::Strip,
    };
    use tokenizers::normalizers::{Prepend, Replace, Sequence as Normalizers};
    let path = &gguf.path;
    let bad = |msg: String| Error::tokenizer(path, msg);
    let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
    let scores: Vec<f32> = match gguf.content.metadata.get("tokenizer.ggml.scores") {
        Some(Value::Array(v)) => v
            .iter()
            .map(|x| x.to_f32().map_err(|e| bad(format!("`tokenizer.ggml.scores`: {e}"))))
            .collect::<Result<_>>()?,
        _ => return Err(bad("missing GGUF metadata key `tokenizer.ggml.scores`".into())),
    };
    if scores.len() != tokens.len() {
        return Err(bad(format!("{} scores for {} tokens", scores.len(), tokens.len())));
    }
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges = merges_from_scores(&tokens, &scores, &vocab);
    let unk = gguf
        .content
        .metadata
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.to_u32().ok())
        .and_then(|i| tokens.get(i as usize).cloned())
        .unwrap_or_else(|| "<unk>".to_string());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| bad(format!("cannot build the SentencePiece vocabulary: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let replace = Replace::new(" ", "▁").map_err(|e| bad(e.to_string()))?;
    tokenizer
        .with_normalizer(Some(Normalizers::new(vec![
            Prepend::new("▁".into()).into(),
            replace.into(),
        ])))
        .map_err(|e| bad(e.to_string()))?;
    let space = tokenizers::decoders::DecoderWrapper::Replace(
        Replace::new("▁", " ").map_err(|e| bad(e.to_string()))?,
    );
    tokenizer.with_decoder(Some(Decoders::new(vec![
        space,
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    add_special_tokens(&mut tokenizer, gguf, &tokens)?;
    Ok(tokenizer)
}

/// transformers' `generate_merges` with scores: every split of every token into two tokens,
/// ordered by the whole token's score (then the pieces' lengths), highest first.
fn merges_from_scores(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Merges {
    let mut merges: Vec<(String, String, f32)> = vec![];
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(&str, &str)> = piece
            .char_indices()
            .skip(1)
            .map(|(i, _)| piece.split_at(i))
            .filter(|(l, r)| vocab.contains_key(*l) && vocab.contains_key(*r))
            .collect();
        local.sort_by_key(|(l, r)| (vocab[*l], vocab[*r]));
        merges.extend(local.into_iter().map(|(l, r)| (l.to_string(), r.to_string(), score)));
    }
    let len = |s: &str| s.chars().count();
    // Stable, descending (Python's `sorted(..., reverse=True)`).
    merges.sort_by(|a, b| {
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(len(&b.0).cmp(&len(&a.0)))
            .then(len(&b.1).cmp(&len(&a.1)))
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

/// Control tokens (`token_type` 3) and user-defined ones (4) are matched whole in the text, as
/// llama.cpp's `tokenizer_st_partition` and Hugging Face's added tokens do.
fn add_special_tokens(tokenizer: &mut Tokenizer, gguf: &GgufFile, tokens: &[String]) -> Result<()> {
    let Some(Value::Array(types)) = gguf.content.metadata.get("tokenizer.ggml.token_type") else {
        return Ok(());
    };
    let (mut control, mut user) = (vec![], vec![]);
    for (i, t) in types.iter().enumerate() {
        let kind = t.to_i32().or_else(|_| t.to_u32().map(|v| v as i32)).unwrap_or(1);
        match (kind, tokens.get(i)) {
            (3, Some(tok)) => control.push(AddedToken::from(tok.clone(), true)),
            (4, Some(tok)) => user.push(AddedToken::from(tok.clone(), false).normalized(false)),
            _ => {}
        }
    }
    let bad = |e: tokenizers::Error| Error::tokenizer(&gguf.path, format!("special tokens: {e}"));
    tokenizer.add_special_tokens(control).map_err(bad)?;
    tokenizer.add_tokens(user).map_err(bad)?;
    Ok(())
}
