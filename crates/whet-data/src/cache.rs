//! The prepared-dataset cache: token ids and masks stored once as safetensors, with a manifest
//! that records the tokenizer and template hashes so a stale cache is detected, not used.

use crate::tokenize::Tokenized;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Version of the cache layout; bumped when it changes.
pub const CACHE_VERSION: u32 = 1;

/// What a prepared dataset was made from and with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`CACHE_VERSION`] at the time of writing.
    pub version: u32,
    /// sha256 of the tokenizer's JSON.
    pub tokenizer_sha256: String,
    /// sha256 of the chat template source.
    pub template_sha256: String,
    /// The settings that shaped the data (format, train_on, max_seq_len, overlong, seed...).
    pub settings: BTreeMap<String, String>,
    /// One entry per split.
    pub splits: Vec<SplitInfo>,
}

/// Counts for one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitInfo {
    /// `train`, `valid` or `test`.
    pub name: String,
    /// The source file.
    pub source: PathBuf,
    /// sha256 of the source file.
    pub source_sha256: String,
    /// Examples kept.
    pub examples: usize,
    /// Tokens kept.
    pub tokens: usize,
    /// Tokens the loss covers.
    pub trained_tokens: usize,
    /// Examples cut to `max_seq_len`.
    pub truncated: usize,
    /// Examples left out (too long, or nothing left to train).
    pub dropped: usize,
}

/// Problems with a cache directory.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Reading or writing failed.
    #[error("{}: {msg}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What happened.
        msg: String,
    },
    /// The cache was made with another tokenizer, template or layout.
    #[error("{}: prepared with a different {what}; hint: run `whet data prepare` again", path.display())]
    Stale {
        /// The cache directory.
        path: PathBuf,
        /// `tokenizer`, `chat template` or `cache version`.
        what: &'static str,
    },
}

/// sha256 of bytes, as hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn io(path: &Path, e: impl std::fmt::Display) -> CacheError {
    CacheError::Io { path: path.to_path_buf(), msg: e.to_string() }
}

/// Write `splits` and `manifest` into the directory `dir` (created if needed). The CLI hands
/// it a fresh staging directory that replaces `--out` only when complete, so a failure leaves
/// no half-written cache behind (whet-cli's `output`).
pub fn save(
    dir: &Path,
    manifest: &Manifest,
    splits: &[(String, Vec<Tokenized>)],
) -> Result<(), CacheError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    for (name, examples) in splits {
        // Preference pairs: the rejected sides as a second set of tensors, `rejected_*`.
        let rejected: Vec<&Tokenized> =
            examples.iter().filter_map(|e| e.rejected.as_deref()).collect();
        if !rejected.is_empty() && rejected.len() != examples.len() {
            return Err(io(
                dir,
                format!("split {name} mixes preference pairs and single examples"),
            ));
        }
        let chosen: Vec<&Tokenized> = examples.iter().collect();
        let mut buffers = vec![("", flatten(&chosen))];
        if !rejected.is_empty() {
            buffers.push(("rejected_", flatten(&rejected)));
        }
        // Unpaired answers (KTO's data): each one's label, 1 where desirable.
        let labels: Vec<u8> = examples.iter().filter_map(|e| e.desirable.map(u8::from)).collect();
        if !labels.is_empty() && labels.len() != examples.len() {
            return Err(io(dir, format!("split {name} mixes unpaired answers and other examples")));
        }
        let mut tensors = vec![];
        if !labels.is_empty() {
            tensors.push(("desirable".to_string(), view(Dtype::U8, labels.len(), &labels, dir)?));
        }
        for (prefix, (ids, mask, offsets)) in &buffers {
            tensors.push((format!("{prefix}ids"), view(Dtype::U32, ids.len() / 4, ids, dir)?));
            tensors.push((format!("{prefix}mask"), view(Dtype::U8, mask.len(), mask, dir)?));
            tensors.push((
                format!("{prefix}offsets"),
                view(Dtype::I64, offsets.len() / 8, offsets, dir)?,
            ));
        }
        let path = dir.join(format!("{name}.safetensors"));
        // Written plainly, so the file takes the user's umask (safetensors' writer makes 0600).
        let bytes = safetensors::serialize(tensors, None).map_err(|e| io(&path, e))?;
        std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
    }
    let path = dir.join("manifest.json");
    let text = serde_json::to_string_pretty(manifest).map_err(|e| io(&path, e))?;
    std::fs::write(&path, text).map_err(|e| io(&path, e))
}

/// The ids (u32 LE), masks and offsets (i64 LE, one more than examples) of `examples`.
fn flatten(examples: &[&Tokenized]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let ids = examples.iter().flat_map(|e| e.ids.iter().flat_map(|v| v.to_le_bytes())).collect();
    let mask = examples.iter().flat_map(|e| e.mask.iter().copied()).collect();
    let mut offsets = vec![0i64];
    for e in examples {
        offsets.push(offsets[offsets.len() - 1] + e.ids.len() as i64);
    }
    (ids, mask, offsets.iter().flat_map(|v| v.to_le_bytes()).collect())
}

fn view<'a>(
    dtype: Dtype,
    n: usize,
    data: &'a [u8],
    dir: &Path,
) -> Result<TensorView<'a>, CacheError> {
    TensorView::new(dtype, vec![n], data).map_err(|e| io(dir, e))
}

/// Read a prepared dataset, refusing it when it was made with another tokenizer or template.
pub fn load(
    dir: &Path,
    tokenizer_sha256: &str,
    template_sha256: &str,
) -> Result<(Manifest, Vec<(String, Vec<Tokenized>)>), CacheError> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| io(&path, format!("invalid manifest: {e}")))?;
    let stale = |what| CacheError::Stale { path: dir.to_path_buf(), what };
    if manifest.version != CACHE_VERSION {
        return Err(stale("cache version"));
    }
    if manifest.tokenizer_sha256 != tokenizer_sha256 {
        return Err(stale("tokenizer"));
    }
    if manifest.template_sha256 != template_sha256 {
        return Err(stale("chat template"));
    }
    let mut splits = vec![];
    for info in &manifest.splits {
        let path = dir.join(format!("{}.safetensors", info.name));
        let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| io(&path, e))?;
        let read = |prefix: &str| -> Result<Vec<Tokenized>, CacheError> {
            let get = |name: &str| st.tensor(&format!("{prefix}{name}")).map_err(|e| io(&path, e));
            let ids: Vec<u32> = get("ids")?
                .data()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let mask: Vec<u8> = get("mask")?.data().to_vec();
            let offsets: Vec<usize> = get("offsets")?
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as usize)
                .collect();
            if mask.len() != ids.len()
                || offsets.last() != Some(&ids.len())
                || offsets.windows(2).any(|w| w[0] > w[1])
            {
                return Err(io(&path, format!("inconsistent {prefix}ids, mask and offsets")));
            }
            Ok(offsets
                .windows(2)
                .map(|w| Tokenized {
                    ids: ids[w[0]..w[1]].to_vec(),
                    mask: mask[w[0]..w[1]].to_vec(),
                    ..Tokenized::default()
                })
                .collect())
        };
        let mut examples = read("")?;
        if st.names().iter().any(|n| n.starts_with("rejected_")) {
            let rejected = read("rejected_")?;
            if rejected.len() != examples.len() {
                return Err(io(&path, "a different number of chosen and rejected sides"));
            }
            for (e, r) in examples.iter_mut().zip(rejected) {
                e.rejected = Some(Box::new(r));
            }
        }
        if st.names().iter().any(|n| *n == "desirable") {
            let labels = st.tensor("desirable").map_err(|e| io(&path, e))?;
            if labels.data().len() != examples.len() {
                return Err(io(&path, "a different number of labels and answers"));
            }
            for (e, &l) in examples.iter_mut().zip(labels.data()) {
                e.desirable = Some(l == 1);
            }
        }
        splits.push((info.name.clone(), examples));
    }
    Ok((manifest, splits))
}
