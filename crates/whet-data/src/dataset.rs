//! A dataset on disk: one JSONL file, or a directory with `train.jsonl` and optionally
//! `valid.jsonl` and `test.jsonl` (the mlx-lm layout); seeded train/valid split when there is no
//! validation file.

use crate::format::{read_jsonl, DataErrors, Format, LineError, Record};
use crate::tokenize::{fit, Overlong, Renderer, Tokenized};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

/// One split of a dataset.
#[derive(Debug, Clone)]
pub struct Split {
    /// `train`, `valid` or `test`.
    pub name: String,
    /// The file it came from.
    pub path: PathBuf,
    /// The file's format.
    pub format: Format,
    /// Its records, in file order.
    pub records: Vec<Record>,
}

/// Read a dataset file or directory; every file is read and every problem reported.
pub fn read(path: &Path, format: Option<Format>) -> Result<Vec<Split>, DataErrors> {
    let mut errors = DataErrors::default();
    let files: Vec<(String, PathBuf)> = if path.is_dir() {
        let train = path.join("train.jsonl");
        if !train.exists() {
            errors.push(LineError {
                path: path.to_path_buf(),
                line: 0,
                msg: "no `train.jsonl` in this directory".into(),
                hint: Some("a dataset directory holds train.jsonl and optionally valid.jsonl and test.jsonl".into()),
            });
            return Err(errors);
        }
        ["train", "valid", "test"]
            .iter()
            .map(|n| (n.to_string(), path.join(format!("{n}.jsonl"))))
            .filter(|(_, p)| p.exists())
            .collect()
    } else if path.exists() {
        vec![("train".to_string(), path.to_path_buf())]
    } else {
        errors.push(LineError {
            path: path.to_path_buf(),
            line: 0,
            msg: "no such file or directory".into(),
            hint: None,
        });
        return Err(errors);
    };
    let mut splits = vec![];
    for (name, file) in files {
        match read_jsonl(&file, format) {
            Ok((format, records)) => splits.push(Split { name, path: file, format, records }),
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(splits)
    } else {
        Err(errors)
    }
}

/// Move a seeded random `fraction` of `train` into a new `valid` split when there is none
/// (at least one record, and at least one left for training).
pub fn split_valid(splits: &mut Vec<Split>, fraction: f64, seed: u64) {
    if splits.iter().any(|s| s.name == "valid") || fraction <= 0.0 {
        return;
    }
    let Some(train) = splits.iter_mut().find(|s| s.name == "train") else { return };
    let n = train.records.len();
    if n < 2 {
        return;
    }
    let k = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let mut chosen = idx[..k].to_vec();
    chosen.sort_unstable();
    let mut valid = Vec::with_capacity(k);
    for &i in chosen.iter().rev() {
        valid.push(train.records.remove(i));
    }
    valid.reverse();
    let (path, format) = (train.path.clone(), train.format);
    splits.push(Split { name: "valid".into(), path, format, records: valid });
}

/// A split after rendering, masking and the length policy.
#[derive(Debug, Clone)]
pub struct PreparedSplit {
    /// `train`, `valid` or `test`.
    pub name: String,
    /// The source file.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Source line of each kept example.
    pub lines: Vec<usize>,
    /// The kept examples.
    pub examples: Vec<Tokenized>,
    /// Examples cut to the length limit.
    pub truncated: usize,
    /// Examples left out (too long under `Overlong::Drop`, or nothing left to train).
    pub dropped: usize,
    /// Preference pairs whose chosen and rejected answers are the same (kept, and warned of:
    /// they teach nothing but move the reward statistics).
    pub identical: usize,
}

impl PreparedSplit {
    /// Total tokens.
    pub fn tokens(&self) -> usize {
        self.examples.iter().map(|e| e.ids.len()).sum()
    }

    /// Tokens the loss covers.
    pub fn trained_tokens(&self) -> usize {
        self.examples.iter().map(Tokenized::trained).sum()
    }
}

/// Render, mask and tokenize every split; problems (a template that fails on a record, a record
/// with nothing to train) are reported as `path:line:` errors.
pub fn prepare(
    splits: &[Split],
    renderer: &Renderer,
    max_seq_len: usize,
    overlong: Overlong,
) -> Result<Vec<PreparedSplit>, DataErrors> {
    let mut errors = DataErrors::default();
    let mut out = vec![];
    for split in splits {
        let examples: Vec<&crate::format::Example> =
            split.records.iter().map(|r| &r.example).collect();
        let mut prepared = PreparedSplit {
            name: split.name.clone(),
            path: split.path.clone(),
            format: split.format,
            lines: vec![],
            examples: vec![],
            truncated: 0,
            dropped: 0,
            identical: 0,
        };
        for (record, result) in split.records.iter().zip(renderer.tokenize_batch(&examples)) {
            let t = match result {
                Ok(t) => t,
                Err(msg) => {
                    errors.push(LineError {
                        path: split.path.clone(),
                        line: record.line,
                        msg,
                        hint: None,
                    });
                    continue;
                }
            };
            if t.trained() == 0 {
                errors.push(LineError {
                    path: split.path.clone(),
                    line: record.line,
                    msg: "no token of this example is trained".into(),
                    hint: Some("every assistant turn is marked `\"train\": false`, or --train-on excludes them".into()),
                });
                continue;
            }
            if let crate::format::Example::Preference { chosen, rejected, .. } = &record.example {
                if chosen == rejected {
                    prepared.identical += 1;
                    tracing::warn!(
                        "{}:{}: `chosen` and `rejected` are the same answer; the pair teaches nothing",
                        split.path.display(),
                        record.line
                    );
                }
            }
            let long = t.ids.len() > max_seq_len
                || t.rejected.as_ref().is_some_and(|r| r.ids.len() > max_seq_len);
            match fit(t, max_seq_len, overlong) {
                Some(t) => {
                    prepared.truncated += usize::from(long);
                    prepared.lines.push(record.line);
                    prepared.examples.push(t);
                }
                None => prepared.dropped += 1,
            }
        }
        out.push(prepared);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_split_is_deterministic_and_disjoint() {
        let dir = tempfile::tempdir().unwrap();
        let lines: String = (0..20).map(|i| format!("{{\"text\":\"t{i}\"}}\n")).collect();
        std::fs::write(dir.path().join("train.jsonl"), lines).unwrap();
        let run = |seed| {
            let mut s = read(dir.path(), None).unwrap();
            split_valid(&mut s, 0.2, seed);
            (
                s[0].records.iter().map(|r| r.line).collect::<Vec<_>>(),
                s[1].records.iter().map(|r| r.line).collect::<Vec<_>>(),
            )
        };
        let (train, valid) = run(1);
        assert_eq!((train.len(), valid.len()), (16, 4));
        assert!(valid.iter().all(|l| !train.contains(l)));
        assert_eq!(run(1), (train.clone(), valid.clone()));
        assert_ne!(run(2).1, valid);
    }

    #[test]
    fn a_directory_needs_train_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("valid.jsonl"), "{\"text\":\"a\"}\n").unwrap();
        let e = read(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("no `train.jsonl` in this directory"), "{e}");
    }
}
