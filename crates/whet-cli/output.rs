//! The one way a command writes its `--out`: a command never deletes or replaces what it did
//! not create, and never its own input.
//!
//! [`Output::plan`] runs every check before any work starts: an existing non-empty path is kept
//! unless `--overwrite` is given; with `--overwrite` a directory is replaced only when whet made
//! it for the same command (its marker file, [`MARKER`]), a file only when it is of the kind the
//! command writes; and a path that is, or holds, one of the command's inputs is refused
//! outright. The command then writes into [`Output::staging`], beside the target, and
//! [`Output::commit`] moves it into place by rename, so a failure or a stop leaves the old
//! output whole and no half-written one.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The file whet leaves in every directory it writes for a command: the command's name.
pub const MARKER: &str = ".whet-output";

/// What a command writes at its `--out`.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// A directory (a report, a prepared dataset, a merged model, a run).
    Dir,
    /// One file; an existing one is replaced (with `--overwrite`) only when it starts with
    /// `magic` (b"GGUF" for a GGUF file), so `--out notes.txt` cannot replace a note.
    File { magic: &'static [u8] },
}

/// An output path that passed every check, and where its new content is being written.
#[derive(Debug)]
pub struct Output {
    target: PathBuf,
    shape: Shape,
    command: &'static str,
    staging: PathBuf,
    committed: bool,
}

/// `path` made absolute with every symbolic link resolved, also where its last parts do not
/// exist yet (the deepest existing ancestor is resolved and the rest appended).
fn resolved(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut rest = vec![];
    let mut cur = abs.as_path();
    loop {
        if let Ok(real) = cur.canonicalize() {
            return rest.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// Whether `dir` is marked as written by `whet COMMAND`: its [`MARKER`] names the command, or,
/// for `train`, it holds the whet.toml every run writes before its first step (runs made
/// before the marker existed have only that).
fn made_by(dir: &Path, command: &str) -> bool {
    let marker = std::fs::read_to_string(dir.join(MARKER)).ok();
    marker.as_deref().map(str::trim) == Some(command)
        || (command == "train" && dir.join("whet.toml").is_file())
}

fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_none())
}

/// A name beside `target` no other process picks: `.NAME.whet-STAGE-PID-N`.
fn sibling(target: &Path, stage: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    target.with_file_name(format!(".{name}.whet-{stage}-{}-{n}", std::process::id()))
}

impl Output {
    /// Check `--out` (`target`) for `whet COMMAND` before any work, and prepare its staging
    /// place. `inputs` are the command's inputs by flag (`("--data", path)`): the output may be
    /// neither one of them nor a directory holding one.
    pub fn plan(
        target: &Path,
        shape: Shape,
        command: &'static str,
        overwrite: bool,
        inputs: &[(&str, &Path)],
    ) -> Result<Self> {
        if target.as_os_str().is_empty() {
            bail!("--out is empty");
        }
        let out = resolved(target);
        for (flag, input) in inputs {
            let input = resolved(input);
            if input == out {
                bail!(
                    "--out `{}` is this command's input ({flag}); refusing to overwrite it\nhint: write to another path",
                    target.display()
                );
            }
            if input.starts_with(&out) {
                bail!(
                    "--out `{}` holds this command's input ({flag} `{}`); replacing it would delete the input\nhint: write to another path",
                    target.display(),
                    input.display()
                );
            }
        }
        match std::fs::symlink_metadata(target) {
            Err(_) => {}
            Ok(meta) => match shape {
                Shape::Dir if !meta.is_dir() => bail!(
                    "--out `{}` is a file, and `whet {command}` writes a directory there\nhint: name a new directory",
                    target.display()
                ),
                Shape::File { .. } if meta.is_dir() => bail!(
                    "--out `{}` is a directory, and `whet {command}` writes a file there\nhint: name the file to write",
                    target.display()
                ),
                Shape::Dir if is_empty_dir(target) => {}
                _ if !overwrite => bail!(
                    "--out `{}` already exists\nhint: pass --overwrite to replace it, or write to another path",
                    target.display()
                ),
                Shape::Dir => {
                    if !made_by(target, command) {
                        bail!(
                            "--out `{}` was not written by `whet {command}` (no {MARKER} naming it); refusing to replace it with --overwrite\nhint: write to another path, or remove it yourself",
                            target.display()
                        );
                    }
                }
                Shape::File { magic } => {
                    let mut head = vec![0u8; magic.len()];
                    let same_kind = std::fs::File::open(target)
                        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                        .is_ok()
                        && head == magic;
                    if !same_kind {
                        bail!(
                            "--out `{}` is not a file `whet {command}` writes (it does not start with `{}`); refusing to replace it with --overwrite\nhint: write to another path",
                            target.display(),
                            String::from_utf8_lossy(magic)
                        );
                    }
                }
            },
        }
        Ok(Self {
            target: target.to_path_buf(),
            shape,
            command,
            staging: sibling(target, "new"),
            committed: false,
        })
    }

    /// Where to write the new output: for [`Shape::Dir`] an empty directory made now (with the
    /// user's umask), for [`Shape::File`] a path not yet written; both beside the target, on
    /// its file system.
    pub fn staging(&self) -> Result<&Path> {
        if let Shape::Dir = self.shape {
            if !self.staging.exists() {
                std::fs::create_dir_all(&self.staging)
                    .with_context(|| format!("cannot create {}", self.staging.display()))?;
            }
        } else if let Some(parent) = self.staging.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        Ok(&self.staging)
    }

    /// Move the staged output into place: a directory gets its marker, then replaces the old
    /// one (moved aside first, removed last: one of the two is whole at every moment).
    pub fn commit(mut self) -> Result<PathBuf> {
        let staging = self.staging()?.to_path_buf();
        if let Shape::Dir = self.shape {
            let marker = staging.join(MARKER);
            std::fs::write(&marker, format!("{}\n", self.command))
                .with_context(|| format!("cannot write {}", marker.display()))?;
            if self.target.exists() {
                let old = sibling(&self.target, "old");
                std::fs::rename(&self.target, &old)
                    .with_context(|| format!("cannot move {} aside", self.target.display()))?;
                std::fs::rename(&staging, &self.target)
                    .with_context(|| format!("cannot write {}", self.target.display()))?;
                let _ = std::fs::remove_dir_all(&old);
            } else {
                std::fs::rename(&staging, &self.target)
                    .with_context(|| format!("cannot write {}", self.target.display()))?;
            }
        } else {
            std::fs::rename(&staging, &self.target)
                .with_context(|| format!("cannot write {}", self.target.display()))?;
        }
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for Output {
    /// An output never committed (an error, a stop) leaves nothing behind.
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
            let _ = std::fs::remove_file(&self.staging);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(t: &Path, overwrite: bool, inputs: &[(&str, &Path)]) -> Result<Output> {
        Output::plan(t, Shape::Dir, "eval", overwrite, inputs)
    }

    #[test]
    fn a_directory_whet_did_not_make_is_never_replaced() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::write(run.join("adapter_model.safetensors"), "x").unwrap();
        let e = plan(&run, false, &[]).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        let e = plan(&run, true, &[]).unwrap_err().to_string();
        assert!(e.contains("was not written by `whet eval`"), "{e}");
        // Another command's output is not this one's either.
        std::fs::write(run.join(MARKER), "compare\n").unwrap();
        assert!(plan(&run, true, &[]).is_err());
        assert!(run.join("adapter_model.safetensors").exists());
    }

    #[test]
    fn the_commands_own_output_is_replaced_whole() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("report");
        let first = plan(&out, false, &[]).unwrap();
        std::fs::write(first.staging().unwrap().join("a"), "1").unwrap();
        first.commit().unwrap();
        let second = plan(&out, true, &[]).unwrap();
        std::fs::write(second.staging().unwrap().join("b"), "2").unwrap();
        second.commit().unwrap();
        assert!(!out.join("a").exists() && out.join("b").exists());
        // Nothing else is left beside it.
        let names: Vec<_> =
            std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("report")]);
    }

    #[test]
    fn an_input_or_a_directory_holding_one_is_refused_even_with_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("train.jsonl"), "{}").unwrap();
        std::fs::write(data.join(MARKER), "eval\n").unwrap();
        let e = plan(&data, true, &[("--data", &data)]).unwrap_err().to_string();
        assert!(e.contains("is this command's input (--data)"), "{e}");
        let e =
            plan(d.path(), true, &[("--data", &data.join("train.jsonl"))]).unwrap_err().to_string();
        assert!(e.contains("holds this command's input"), "{e}");
        // Through a symbolic link too.
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        assert!(plan(&link, true, &[("--data", &data)]).is_err());
        // A new directory inside the input is fine.
        assert!(plan(&data.join("prepared"), false, &[("--data", &data)]).is_ok());
    }

    #[test]
    fn a_file_is_replaced_only_by_a_file_of_its_kind() {
        let d = tempfile::tempdir().unwrap();
        let notes = d.path().join("notes.gguf");
        std::fs::write(&notes, "my notes").unwrap();
        let file = Shape::File { magic: b"GGUF" };
        let e = Output::plan(&notes, file, "adapter convert", true, &[]).unwrap_err().to_string();
        assert!(e.contains("not a file `whet adapter convert` writes"), "{e}");
        std::fs::write(&notes, "GGUF....").unwrap();
        let o = Output::plan(&notes, file, "adapter convert", true, &[]).unwrap();
        std::fs::write(o.staging().unwrap(), "GGUFnew").unwrap();
        o.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&notes).unwrap(), "GGUFnew");
        let e = Output::plan(d.path(), file, "adapter convert", true, &[]).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
    }

    #[test]
    fn an_output_never_committed_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("prepared");
        {
            let o = plan(&out, false, &[]).unwrap();
            std::fs::write(o.staging().unwrap().join("half"), "x").unwrap();
        }
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
