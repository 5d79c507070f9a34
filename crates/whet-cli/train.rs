//! `whet train`: settings from file and flags, data through whet-data, the loop in whet-train,
//! progress on stderr, the run's outcome on stdout.

use crate::args::{DataArgs, ShapeArgs, TemplateArgs, TrainArgs};
use crate::data::{run_pipeline, ModelText};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use whet_train::{Event, ObjectiveKind, TrainConfig, TrainData, World};

/// The settings: the resumed run's, or --config's, or the defaults; then the flags the user
/// gave (`given`: their ids, the settings' field names).
fn config(a: &TrainArgs, given: &[String]) -> Result<TrainConfig> {
    let (base, file_sets_steps) = if a.resume {
        let saved = a.out.join("whet.toml");
        if !saved.exists() {
            bail!("cannot resume {}: no whet.toml there", a.out.display());
        }
        TrainConfig::from_file_with_steps(&saved)?
    } else if let Some(path) = &a.config {
        TrainConfig::from_file_with_steps(path)?
    } else {
        (TrainConfig::default(), false)
    };
    let mut c = base.with_flags(&a.settings, given)?;
    for (off, setting) in [
        (a.no_rslora, &mut c.use_rslora),
        (a.no_pack, &mut c.pack),
        (a.no_grad_checkpoint, &mut c.grad_checkpoint),
    ] {
        if off {
            *setting = false;
        }
    }
    if let Some(dir) = c.init_adapter.clone() {
        let rslora_given = a.no_rslora || given.iter().any(|g| g == "use_rslora");
        inherit_adapter(&mut c, Path::new(&dir), given, rslora_given)?;
    }
    // --epochs sets the steps unless they are given too (then --steps wins); the count needs
    // the data, so it is resolved once the data is loaded.
    if c.epochs.is_some() && !given.iter().any(|g| g == "steps") && !file_sets_steps {
        c.steps = 0;
    }
    Ok(c)
}

/// `--init-adapter DIR`: the run trains that adapter on, so its rank, alpha, targets and
/// scaling are the run's; a flag or `--config` setting that says otherwise is refused rather
/// than overridden.
fn inherit_adapter(
    c: &mut TrainConfig,
    dir: &Path,
    given: &[String],
    rslora_given: bool,
) -> Result<()> {
    let u = whet_model::adapter::PeftAdapter::read(dir)
        .and_then(|a| a.uniform())
        .with_context(|| format!("--init-adapter {}", dir.display()))?;
    let modules = |t: &str| {
        let mut m = whet_model::lora::LoraConfig::new(1, 1.0, 0.0, t, false)
            .map(|l| l.targets)
            .unwrap_or_else(|_| vec![t.to_string()]);
        m.sort();
        m
    };
    let d = TrainConfig::default();
    for (id, flag, mine, theirs, same, default) in [
        ("r", "--rank", c.r.to_string(), u.r.to_string(), c.r == u.r, c.r == d.r),
        (
            "lora_alpha",
            "--alpha",
            c.lora_alpha.to_string(),
            u.lora_alpha.to_string(),
            c.lora_alpha == u.lora_alpha,
            c.lora_alpha == d.lora_alpha,
        ),
        (
            "target_modules",
            "--targets",
            c.target_modules.clone(),
            u.target_modules.clone(),
            modules(&c.target_modules) == modules(&u.target_modules),
            c.target_modules == d.target_modules,
        ),
        (
            "use_rslora",
            "--rslora",
            c.use_rslora.to_string(),
            u.use_rslora.to_string(),
            c.use_rslora == u.use_rslora,
            c.use_rslora == d.use_rslora,
        ),
    ] {
        // Typed, or set by --config's file to other than the default.
        let typed = if id == "use_rslora" { rslora_given } else { given.iter().any(|g| g == id) };
        if !same && (typed || !default) {
            bail!(
                "{flag} {mine}: the --init-adapter {} has {id} = {theirs}, and the run trains that adapter on\nhint: leave {flag} out (and its key out of --config's file)",
                dir.display()
            );
        }
    }
    c.r = u.r;
    c.lora_alpha = u.lora_alpha;
    c.target_modules = u.target_modules;
    c.use_rslora = u.use_rslora;
    Ok(())
}

pub(crate) fn load_data(c: &TrainConfig, text: &ModelText) -> Result<TrainData> {
    let path = Path::new(&c.data);
    if path.join("manifest.json").exists() {
        let (tok, tmpl) = text.hashes()?;
        let (manifest, splits) = whet_data::cache::load(path, &tok, &tmpl)?;
        let get = |name: &str| {
            splits.iter().find(|(n, _)| n == name).map(|(_, e)| e.clone()).unwrap_or_default()
        };
        let sources = manifest
            .splits
            .iter()
            .map(|s| (s.name.clone(), format!("{}, prepared in {}", s.source.display(), c.data)))
            .collect();
        return Ok(TrainData { train: get("train"), valid: get("valid"), sources });
    }
    let args = DataArgs {
        path: path.to_path_buf(),
        model: Some(c.model.clone()),
        shape: ShapeArgs { format: Some(c.format), overlong: Some(c.overlong) },
        template: TemplateArgs { template_var: c.template_vars.clone() },
        train_on: c.train_on,
        max_seq_len: c.max_seq_len,
        valid_fraction: c.valid_fraction,
        seed: c.seed,
    };
    let (_, splits) = run_pipeline(&args, text)?;
    // Pairs for a pair objective, labelled answers for KTO, answers for SFT: the first record
    // of the wrong kind is named.
    for split in &splits {
        let line = split.lines.first().copied().unwrap_or(1);
        let at = format!("{}:{line}", split.path.display());
        let o = c.objective.name();
        let want = match c.objective {
            ObjectiveKind::Sft => None,
            ObjectiveKind::Kto => Some(whet_data::Format::Unpaired),
            _ => Some(whet_data::Format::Preference),
        };
        match (want, split.format) {
            (Some(w), f) if w == f => {}
            (None, f @ (whet_data::Format::Preference | whet_data::Format::Unpaired)) => bail!(
                "{at}: a `{}` record, but --objective sft trains on answers\nhint: --objective {} trains on {}",
                f.name(),
                if f == whet_data::Format::Unpaired { "kto" } else { "dpo (or ipo, simpo, orpo)" },
                if f == whet_data::Format::Unpaired { "answers marked desirable or not" } else { "pairs" },
            ),
            (None, _) => {}
            (Some(whet_data::Format::Unpaired), f) => bail!(
                "{at}: a `{}` record, but --objective kto trains on answers marked desirable or not\nhint: give records with `prompt`, `completion` and `label` (true or false){}",
                f.name(),
                if f == whet_data::Format::Preference { ", or train pairs with --objective dpo" } else { "" },
            ),
            (Some(_), f) => bail!(
                "{at}: a `{}` record, but --objective {o} trains on preference pairs\nhint: give records with `prompt`, `chosen` and `rejected`, or train with --objective {}",
                f.name(),
                if f == whet_data::Format::Unpaired { "kto" } else { "sft" },
            ),
        }
    }
    let take = |name: &str| {
        splits.iter().find(|s| s.name == name).map(|s| s.examples.clone()).unwrap_or_default()
    };
    let sources = splits.iter().map(|s| (s.name.clone(), s.path.display().to_string())).collect();
    Ok(TrainData { train: take("train"), valid: take("valid"), sources })
}

/// Whether `dir` is a prepared dataset whose manifest asks for packing.
fn prepared_with_pack(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("manifest.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<whet_data::cache::Manifest>(&t).ok())
        .is_some_and(|m| m.settings.get("pack").is_some_and(|v| v == "true"))
}

/// The base model and the data of `c`, on its device (in a distributed run, a CUDA device is
/// the GPU of this rank's local rank).
fn model_and_data(
    c: &TrainConfig,
    world: &World,
) -> Result<(whet_model::LoadedModel, TrainData, candle_core::Device)> {
    let device = world.rank_device(c.device.open()?, c.device)?;
    let dtype = c.dtype.dtype();
    let quantize = c.quantize_base.map(whet_model::Quantization::ggml);
    let m = crate::model::load_spec_quantized(&c.model, dtype, &device, c.seed, quantize)?;
    let context = m.model.config().max_position_embeddings;
    if c.max_seq_len > context {
        bail!(
            "--max-seq-len {} is longer than the context of {} ({context} tokens): its positions past {context} were never trained\nhint: pass --max-seq-len {context} or less",
            c.max_seq_len,
            c.model
        );
    }
    let text = ModelText::from_tokenizer(m.tokenizer.clone(), &c.template_vars)?;
    let data = load_data(c, &text)?;
    if data.train.is_empty() {
        bail!("{}: no training examples", c.data);
    }
    // A prepared dataset carries its own length limit.
    let longest = data.train.iter().chain(&data.valid).map(|e| e.ids.len()).max().unwrap_or(0);
    if longest > context {
        bail!(
            "{}: an example has {longest} tokens, longer than the context of {} ({context} tokens)\nhint: prepare it again with --max-seq-len {context}",
            c.data,
            c.model
        );
    }
    Ok((m, data, device))
}

/// A preference objective's reward margin and accuracy, for a progress line (empty for SFT).
fn preference_summary(metrics: &[(String, f64)]) -> String {
    let get = |name: &str| metrics.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
    // KTO has no pairs to be accurate on; a batch without one of its sides has no margin.
    let margin = match get("rewards/margins") {
        Some(m) if m.is_finite() => format!(" | margin {m:.3}"),
        Some(_) => " | margin -".to_string(),
        None => return String::new(),
    };
    match (get("rewards/accuracies"), get("kl")) {
        (Some(a), _) => format!("{margin} | accuracy {a:.2}"),
        (None, Some(kl)) => format!("{margin} | kl {kl:.3}"),
        (None, None) => margin,
    }
}

/// Train with `c` into the run directory `out` (replaced), without a progress display (steps
/// are logged at info level), for `whet compare --learning-curve`; the adapter's directory.
pub fn train_quietly(mut c: TrainConfig, out: &Path) -> Result<std::path::PathBuf> {
    c.validate()?;
    let world = World::single();
    let (mut m, data, _device) = model_and_data(&c, &world)?;
    c.resolve_steps(whet_train::trainer::training_rows(&data, &c));
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("cannot remove {}", out.display()))?;
    }
    let stop = AtomicBool::new(false);
    let mut on_event = |e: &Event| {
        if let Event::Step { step, loss, .. } = e {
            if step % 10 == 0 {
                tracing::info!("{}: step {step}/{}: loss {loss:.4}", out.display(), c.steps);
            }
        }
    };
    whet_train::train(&mut m.model, &data, &c, out, false, &stop, &world, &mut on_event)?;
    Ok(out.join("adapter"))
}

pub fn run(a: TrainArgs, given: &[String]) -> Result<()> {
    let mut c = config(&a, given)?;
    c.validate()?;
    let mut world = World::from_launch(a.distributed)?;
    let root = world.is_root();
    // Everything about --out is checked before the slow model load: never an input, never a
    // directory another command (or no whet command) wrote.
    // A run's whet.toml, written before its first step, marks it as train's.
    if a.overwrite && !a.resume {
        let mut inputs: Vec<(&str, &Path)> = vec![];
        inputs.extend(Some(Path::new(&c.data)).filter(|d| d.exists()).map(|d| ("--data", d)));
        inputs.extend(Some(Path::new(&c.model)).filter(|m| m.exists()).map(|m| ("--model", m)));
        inputs.extend(a.config.as_deref().map(|c| ("--config", c)));
        inputs.extend(c.init_adapter.as_deref().map(|d| ("--init-adapter", Path::new(d))));
        let shape = crate::output::Shape::Dir;
        crate::output::Output::plan(&a.out, shape, "train", a.overwrite, &inputs)?;
    }
    // Fail before the slow model load when the run directory cannot be used (rank 0 owns it).
    if !a.overwrite && root {
        whet_train::checkpoint::check_run_dir(&a.out, &c, a.resume)?;
    }
    let (mut m, data, device) = model_and_data(&c, &world)?;
    world.attach_device(&device)?;
    let pack_given = a.no_pack || given.iter().any(|g| g == "pack");
    if !pack_given && prepared_with_pack(Path::new(&c.data)) && !c.pack {
        tracing::warn!(
            "packing examples: {} was prepared with --pack (--no-pack turns it off)",
            c.data
        );
        c.pack = true;
    }
    c.resolve_steps(whet_train::trainer::training_rows(&data, &c));
    // The previous run goes only now that model and data have loaded.
    if a.overwrite && a.out.exists() && root {
        std::fs::remove_dir_all(&a.out)
            .with_context(|| format!("cannot remove {}", a.out.display()))?;
    }
    let quiet = !tracing::enabled!(tracing::Level::WARN) || !root;
    if !quiet {
        if world.is_distributed() {
            eprintln!(
                "distributed: {} ranks over MPI; rank {} (local rank {}) on {}; gradients summed by {}; the global batch is {} x {} micro-batches, split across the ranks",
                world.size(),
                world.rank(),
                world.local_rank(),
                whet_model::device_name(&device),
                world.reducer(),
                c.batch_size,
                c.grad_accum
            );
        }
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
        Event::Step { step, loss, lr, tokens_per_sec, peak_mb, metrics, .. } => {
            let msg = format!(
                "loss {loss:.4}{} | lr {lr:.2e} | {tokens_per_sec:.0} tok/s | {peak_mb:.0} MB",
                preference_summary(metrics)
            );
            bar.set_position(*step as u64);
            if !tty && (step % 10 == 0 || *step == c.steps) {
                say(format!("step {step}/{}: {msg}", c.steps));
            }
            bar.set_message(msg);
        }
        Event::Eval { step, val_loss, best, metrics } => {
            say(format!(
                "step {step}: validation loss {val_loss:.4}{}{}",
                preference_summary(metrics),
                if *best { " (best)" } else { "" }
            ));
        }
        Event::Checkpoint { step } => tracing::info!("checkpoint at step {step}"),
    };
    let summary =
        whet_train::train(&mut m.model, &data, &c, &a.out, a.resume, &stop, &world, &mut on_event)?;
    bar.finish_and_clear();
    world.finish();
    if !root {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "steps:          {} of {}", summary.steps, c.steps)?;
    match summary.final_loss {
        Some(loss) => writeln!(out, "final loss:     {loss:.4}")?,
        None => writeln!(
            out,
            "finished:       the run had already done all {} steps; nothing to resume",
            c.steps
        )?,
    }
    if let Some(v) = summary.best_val_loss {
        writeln!(out, "best val loss:  {v:.4} (adapter in {})", a.out.join("best").display())?;
    }
    writeln!(out, "adapter:        {}", a.out.join("adapter").display())?;
    match summary.stopped {
        Some(why @ whet_train::Stopped::Interrupted) => {
            writeln!(out, "stopped:        {why}; continue with --resume")?;
            out.flush()?;
            // 128 + SIGINT, as a shell reports a command Ctrl-C ended: `train && merge` must
            // not go on with the adapter of an unfinished run. The checkpoint is whole.
            std::process::exit(130);
        }
        Some(why) => writeln!(out, "stopped:        {why}")?,
        None => {}
    }
    Ok(())
}
