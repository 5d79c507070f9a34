//! `whet train`: settings from file and flags, data through whet-data, the loop in whet-train,
//! progress on stderr, the run's outcome on stdout.

use crate::args::{DataArgs, TrainArgs};
use crate::data::{run_pipeline, ModelText};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use whet_train::{Event, TrainConfig, TrainData};

/// The settings: the resumed run's, or --config's, or the defaults; then the flags.
fn config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut c = if a.resume {
        let saved = a.out.join("whet.toml");
        if !saved.exists() {
            bail!("cannot resume {}: no whet.toml there", a.out.display());
        }
        TrainConfig::from_file(&saved)?
    } else if let Some(path) = &a.config {
        TrainConfig::from_file(path)?
    } else {
        TrainConfig::default()
    };
    macro_rules! set {
        ($($flag:ident => $field:ident),* $(,)?) => { $( if let Some(v) = a.$flag.clone() { c.$field = v; } )* };
    }
    set!(model => model, data => data, dtype => dtype, device => device, rank => r, alpha => lora_alpha,
         dropout => lora_dropout, targets => target_modules, learning_rate => learning_rate,
         lr_schedule => lr_schedule, warmup_steps => warmup_steps, steps => steps,
         batch_size => batch_size, grad_accum => grad_accum, max_seq_len => max_seq_len,
         train_on => train_on, weight_decay => weight_decay, max_grad_norm => max_grad_norm,
         eval_every => eval_every, save_every => save_every, patience => patience, seed => seed);
    c.use_rslora |= a.rslora;
    c.pack |= a.pack;
    c.grad_checkpoint |= a.grad_checkpoint;
    Ok(c)
}

fn load_data(c: &TrainConfig, text: &ModelText) -> Result<TrainData> {
    let path = Path::new(&c.data);
    if path.join("manifest.json").exists() {
        let (tok, tmpl) = text.hashes()?;
        let (_, splits) = whet_data::cache::load(path, &tok, &tmpl)?;
        let get = |name: &str| {
            splits.iter().find(|(n, _)| n == name).map(|(_, e)| e.clone()).unwrap_or_default()
        };
        return Ok(TrainData { train: get("train"), valid: get("valid") });
    }
    let args = DataArgs {
        path: path.to_path_buf(),
        model: Some(c.model.clone()),
        format: None,
        train_on: c.train_on.clone(),
        max_seq_len: c.max_seq_len,
        overlong: "truncate".into(),
        valid_fraction: c.valid_fraction,
        seed: c.seed,
    };
    let (_, splits) = run_pipeline(&args, text)?;
    let take = |name: &str| {
        splits.iter().find(|s| s.name == name).map(|s| s.examples.clone()).unwrap_or_default()
    };
    Ok(TrainData { train: take("train"), valid: take("valid") })
}

pub fn run(a: TrainArgs) -> Result<()> {
    let c = config(&a)?;
    c.validate()?;
    if a.overwrite && a.out.exists() && !a.out.join("whet.toml").exists() {
        bail!(
            "{} is not a whet run directory (no whet.toml); refusing to delete it",
            a.out.display()
        );
    }
    // Fail before the slow model load when the run directory cannot be used.
    if !a.overwrite {
        whet_train::checkpoint::check_run_dir(&a.out, &c, a.resume)?;
    }
    let device = whet_model::parse_device(&c.device)?;
    let dtype = whet_model::parse_dtype(&c.dtype)?;
    let mut m = crate::model::load_spec(&c.model, dtype, &device, c.seed)?;
    let text = ModelText::from_tokenizer(m.tokenizer.clone())?;
    let data = load_data(&c, &text)?;
    if data.train.is_empty() {
        bail!("{}: no training examples", c.data);
    }
    // The previous run goes only now that model and data have loaded.
    if a.overwrite && a.out.exists() {
        std::fs::remove_dir_all(&a.out)
            .with_context(|| format!("cannot remove {}", a.out.display()))?;
    }
    let quiet = !tracing::enabled!(tracing::Level::WARN);
    if !quiet {
        eprintln!(
            "training {} on {} ({} train / {} valid examples), {} on {}",
            c.target_modules,
            c.data,
            data.train.len(),
            data.valid.len(),
            m.source,
            whet_model::device_name(&device)
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // First Ctrl-C: finish the step, checkpoint, exit. A second one kills as usual.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to abort)");
    });
    // A progress bar on a terminal; plain lines (every 10 steps and each evaluation) in logs.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = if tty && !quiet { ProgressBar::new(c.steps as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let say = |line: String| {
        if tty {
            bar.println(line);
        } else if !quiet {
            eprintln!("{line}");
        }
    };
    let mut on_event = |e: &Event| match e {
        Event::Step { step, loss, lr, tokens_per_sec, peak_mb, .. } => {
            let msg = format!(
                "loss {loss:.4} | lr {lr:.2e} | {tokens_per_sec:.0} tok/s | {peak_mb:.0} MB"
            );
            bar.set_position(*step as u64);
            if !tty && (step % 10 == 0 || *step == c.steps) {
                say(format!("step {step}/{}: {msg}", c.steps));
            }
            bar.set_message(msg);
        }
        Event::Eval { step, val_loss, best } => {
            say(format!(
                "step {step}: validation loss {val_loss:.4}{}",
                if *best { " (best)" } else { "" }
            ));
        }
        Event::Checkpoint { step } => tracing::info!("checkpoint at step {step}"),
    };
    let summary =
        whet_train::train(&mut m.model, &data, &c, &a.out, a.resume, &stop, &mut on_event)?;
    bar.finish_and_clear();
    let mut out = std::io::stdout().lock();
    writeln!(out, "steps:          {} of {}", summary.steps, c.steps)?;
    writeln!(out, "final loss:     {:.4}", summary.final_loss)?;
    if let Some(v) = summary.best_val_loss {
        writeln!(out, "best val loss:  {v:.4} (adapter in {})", a.out.join("best").display())?;
    }
    writeln!(out, "adapter:        {}", a.out.join("adapter").display())?;
    if let Some(why) = summary.stopped {
        writeln!(out, "stopped:        {why}; continue with --resume")?;
    }
    Ok(())
}
