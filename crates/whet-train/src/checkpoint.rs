//! The run directory: `whet.toml` (the resolved config, written before the first step),
//! `metrics.jsonl`, `checkpoint/` (adapter, optimizer moments, step — written atomically so a
//! crash or a full disk leaves the previous one intact), `best/` and `adapter/` in PEFT format.

use crate::config::TrainConfig;
use crate::error::TrainError;
use crate::events::Event;
use crate::optim::AdamW;
use crate::plot::Curves;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use whet_model::Llama;

/// Loop position saved with a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Best validation loss so far.
    pub best_val: Option<f64>,
    /// Evaluations since the best one.
    pub bad_evals: usize,
    /// AdamW's step count (bias correction).
    pub adam_t: usize,
    /// sha256 of each split's tokens ([`crate::TrainData::fingerprints`]); absent in
    /// checkpoints written before whet recorded it.
    #[serde(default)]
    pub data_sha256: std::collections::BTreeMap<String, String>,
}

fn err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Run(format!("{}: {e}", path.display()))
}

/// Check, without touching anything, that `run` can take a new run (it is absent or empty) or,
/// with `resume`, that it holds a checkpoint whose saved settings equal `cfg` (naming the first
/// field that differs).
pub fn check_run_dir(run: &Path, cfg: &TrainConfig, resume: bool) -> Result<(), TrainError> {
    if resume {
        let saved = TrainConfig::from_file(&run.join("whet.toml"))
            .map_err(|e| TrainError::Run(format!("cannot resume: {e}")))?;
        if let Some((field, was, now)) = saved.first_difference(cfg) {
            return Err(TrainError::Run(format!(
                "cannot resume {}: `{field}` was {was} and is now {now}; hint: resume with the same settings, or start a new run",
                run.display()
            )));
        }
        if !run.join("checkpoint").exists() && !run.join("checkpoint.old").exists() {
            return Err(TrainError::Run(format!(
                "cannot resume {}: it holds no checkpoint",
                run.display()
            )));
        }
        return Ok(());
    }
    if run.exists() && std::fs::read_dir(run).map_err(|e| err(run, e))?.next().is_some() {
        return Err(TrainError::Run(format!(
            "{} already holds files; hint: pass --resume to continue that run, or --overwrite to replace it",
            run.display()
        )));
    }
    Ok(())
}

/// [`check_run_dir`], then, for a new run, create `run` and write the resolved settings.
pub fn prepare_run_dir(run: &Path, cfg: &TrainConfig, resume: bool) -> Result<(), TrainError> {
    check_run_dir(run, cfg, resume)?;
    if !resume {
        std::fs::create_dir_all(run).map_err(|e| err(run, e))?;
        write_synced(&run.join("whet.toml"), cfg.to_toml().as_bytes())?;
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let mut f = std::fs::File::create(path).map_err(|e| err(path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| err(path, e))
}

fn sync(path: &Path) -> Result<(), TrainError> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| err(path, e))
}

/// Replace directory `dest` by `tmp` so that one of the two complete versions always exists:
/// `dest` moves to `dest.old`, `tmp` to `dest`, then `dest.old` goes.
fn swap_in(tmp: &Path, dest: &Path) -> Result<(), TrainError> {
    let old = dest.with_extension("old");
    if dest.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dest, &old).map_err(|e| err(dest, e))?;
    }
    std::fs::rename(tmp, dest).map_err(|e| err(dest, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn tmp_dir(dest: &Path) -> Result<PathBuf, TrainError> {
    let tmp = dest.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| err(&tmp, e))?;
    Ok(tmp)
}

/// Save the adapter (PEFT format) to `dest` atomically.
pub fn save_adapter_atomically(model: &Llama, dest: &Path, base: &str) -> Result<(), TrainError> {
    let tmp = tmp_dir(dest)?;
    whet_model::adapter::save_adapter(model, &tmp, base).map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        TrainError::Model(e)
    })?;
    sync(&tmp.join("adapter_model.safetensors"))?;
    swap_in(&tmp, dest)
}

/// Write a checkpoint: adapter, optimizer moments and loop state.
pub fn save(run: &Path, model: &Llama, opt: &AdamW, state: &TrainState) -> Result<(), TrainError> {
    let dest = run.join("checkpoint");
    let tmp = tmp_dir(&dest)?;
    let result = (|| {
        whet_model::adapter::save_adapter(model, &tmp, "checkpoint")?;
        let moments: Vec<(String, Tensor)> = opt
            .state
            .iter()
            .enumerate()
            .flat_map(|(i, (_, m, v))| {
                [(format!("m.{i}"), m.clone()), (format!("v.{i}"), v.clone())]
            })
            .collect();
        whet_model::adapter::write_safetensors(&tmp.join("optimizer.safetensors"), &moments)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(TrainError::Model(e));
    }
    let state = TrainState { adam_t: opt.t, ..state.clone() };
    write_synced(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(&state).unwrap_or_default().as_bytes(),
    )?;
    sync(&tmp.join("adapter_model.safetensors"))?;
    sync(&tmp.join("optimizer.safetensors"))?;
    swap_in(&tmp, &dest)
}

/// Which checkpoint survives, for messages.
pub fn describe(run: &Path) -> String {
    let path = run.join("checkpoint/state.json");
    match std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<TrainState>(&t).ok())
    {
        Some(s) => format!("step {} in {}", s.step, run.join("checkpoint").display()),
        None => "none yet".into(),
    }
}

/// Restore adapter, optimizer and loop state from `run`'s checkpoint.
pub fn load(run: &Path, model: &mut Llama, opt: &mut AdamW) -> Result<TrainState, TrainError> {
    let mut dir = run.join("checkpoint");
    if !dir.exists() {
        dir = run.join("checkpoint.old"); // a crash between the two renames of `swap_in`
    }
    let text = std::fs::read_to_string(dir.join("state.json")).map_err(|e| err(&dir, e))?;
    let state: TrainState =
        serde_json::from_str(&text).map_err(|e| err(&dir.join("state.json"), e))?;
    let adapter =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), model.device())
            .map_err(|e| err(&dir, e))?;
    for (name, var) in model.lora_vars() {
        let t = adapter.get(&name).ok_or_else(|| err(&dir, format!("missing `{name}`")))?;
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), model.device())
        .map_err(|e| err(&dir, e))?;
    for (i, (_, m, v)) in opt.state.iter_mut().enumerate() {
        *m = moments
            .get(&format!("m.{i}"))
            .ok_or_else(|| err(&dir, format!("missing `m.{i}`")))?
            .to_dtype(m.dtype())?;
        *v = moments
            .get(&format!("v.{i}"))
            .ok_or_else(|| err(&dir, format!("missing `v.{i}`")))?
            .to_dtype(v.dtype())?;
    }
    opt.t = state.adam_t;
    Ok(state)
}

/// The metric `loss.svg` draws beside the loss, where an objective logs it.
const MARGINS: &str = "rewards/margins";

/// `metrics.jsonl`: one JSON object per step and per evaluation.
pub struct Metrics {
    file: std::fs::File,
    /// The losses (and margins) so far, for `loss.svg`.
    curves: Curves,
    svg: PathBuf,
}

impl Metrics {
    /// Open for appending; lines for steps after `from_step` (left by an interrupted run) are
    /// dropped so a resumed run's log has each step once.
    pub fn open(run: &Path, from_step: usize) -> Result<Self, TrainError> {
        let path = run.join("metrics.jsonl");
        let kept: Vec<String> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= from_step)
            })
            .map(str::to_string)
            .collect();
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        std::fs::write(&path, text).map_err(|e| err(&path, e))?;
        let mut curves = Curves::default();
        for line in &kept {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let step = v["step"].as_u64().unwrap_or(0) as usize;
            let margin = v[MARGINS].as_f64();
            if let Some(l) = v["loss"].as_f64() {
                curves.train.push((step, l));
                curves.margins.extend(margin.map(|m| (step, m)));
            }
            if let Some(l) = v["val_loss"].as_f64() {
                curves.valid.push((step, l));
                curves.val_margins.extend(margin.map(|m| (step, m)));
            }
        }
        let file =
            std::fs::OpenOptions::new().append(true).open(&path).map_err(|e| err(&path, e))?;
        Ok(Self { file, curves, svg: run.join("loss.svg") })
    }

    /// Redraw `loss.svg` (at each evaluation and at the end of the run).
    pub fn plot(&self) {
        if let Err(e) = crate::plot::loss_curve(&self.svg, &self.curves) {
            tracing::warn!("cannot draw {}: {e}", self.svg.display());
        }
    }

    /// Append one event.
    pub fn write(&mut self, e: &Event) -> Result<(), TrainError> {
        let margin =
            |metrics: &[(String, f64)]| metrics.iter().find(|(k, _)| k == MARGINS).map(|(_, v)| *v);
        let c = &mut self.curves;
        match e {
            Event::Step { step, loss, metrics, .. } => {
                c.train.push((*step, *loss));
                c.margins.extend(margin(metrics).map(|m| (*step, m)));
            }
            Event::Eval { step, val_loss, metrics, .. } => {
                c.valid.push((*step, *val_loss));
                c.val_margins.extend(margin(metrics).map(|m| (*step, m)));
            }
            Event::Checkpoint { .. } => {}
        }
        let v = match e {
            Event::Step {
                step,
                loss,
                lr,
                grad_norm,
                tokens,
                secs,
                tokens_per_sec,
                allreduce_secs,
                peak_mb,
                metrics,
            } => {
                let mut v = serde_json::json!({
                "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                "secs": secs, "tokens_per_sec": tokens_per_sec, "allreduce_secs": allreduce_secs,
                "peak_rss_mb": peak_mb});
                for (name, value) in metrics {
                    v[name] = (*value).into();
                }
                v
            }
            Event::Eval { step, val_loss, metrics, .. } => {
                let mut v = serde_json::json!({"step": step, "val_loss": val_loss});
                for (name, value) in metrics {
                    v[name] = (*value).into();
                }
                v
            }
            Event::Checkpoint { .. } => return Ok(()),
        };
        writeln!(self.file, "{v}").map_err(|e| TrainError::Run(format!("metrics.jsonl: {e}")))
    }
}
