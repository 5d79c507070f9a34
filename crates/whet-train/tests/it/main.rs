//! whet-train integration tests on the tiny random model: the loop learns, resume is exact,
//! adapters are in PEFT's format, and bad settings are refused without losing anything.

use candle_core::{DType, Device};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use whet_data::Tokenized;
use whet_model::{load, Llama, ModelSource};
use whet_train::{train, Event, TrainConfig, TrainData, TrainError, World};

fn tiny() -> Llama {
    load(&ModelSource::Random("tiny".into()), DType::F32, &Device::Cpu, 3).unwrap().model
}

/// Eight short "prompt -> answer" sequences; the answer half is trained.
fn data() -> TrainData {
    let ex = |k: u32| {
        let ids: Vec<u32> = (0..12).map(|i| (k * 37 + i * (k + 3)) % 250 + 3).collect();
        Tokenized { mask: (0..12).map(|i| u8::from(i >= 6)).collect(), ids, ..Default::default() }
    };
    TrainData {
        train: (0..8).map(ex).collect(),
        valid: (8..10).map(ex).collect(),
        ..Default::default()
    }
}

fn cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        model: "random:tiny".into(),
        data: "in-memory".into(),
        r: 8,
        lora_alpha: 16.0,
        target_modules: "all-linear".into(),
        learning_rate: 1e-2,
        lr_schedule: whet_train::config::Schedule::Constant,
        warmup_steps: 0,
        steps,
        batch_size: 4,
        eval_every: 0,
        save_every: 0,
        ..Default::default()
    }
}

fn run(
    model: &mut Llama,
    cfg: &TrainConfig,
    dir: &Path,
    resume: bool,
) -> Result<(whet_train::Summary, Vec<Event>), TrainError> {
    let mut events = vec![];
    let s = train(
        model,
        &data(),
        cfg,
        dir,
        resume,
        &AtomicBool::new(false),
        &World::single(),
        &mut |e| events.push(e.clone()),
    )?;
    Ok((s, events))
}

#[test]
fn overfits_a_tiny_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let (summary, events) = run(&mut tiny(), &cfg(150), &dir.path().join("run"), false).unwrap();
    let first = match &events[0] {
        Event::Step { loss, .. } => *loss,
        e => panic!("{e:?}"),
    };
    assert!(first > 4.0, "starts near ln(320) = 5.77: {first}");
    let last = summary.final_loss.unwrap();
    assert!(last < 0.05, "memorised: {last} (from {first})");
    for f in [
        "whet.toml",
        "metrics.jsonl",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "checkpoint/state.json",
    ] {
        assert!(dir.path().join("run").join(f).exists(), "{f}");
    }
    let svg = std::fs::read_to_string(dir.path().join("run/loss.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("validation") && svg.contains("<polyline"),
        "loss curve drawn"
    );
}

/// The mixed-precision path (`--dtype bf16`, meant for GPUs): bf16 base weights, f32 adapters
/// and optimizer state. On the CPU it must learn as well, and write f32 adapters. Regression:
/// the cross-entropy's gradient came back in f32 for bf16 logits, and the first backward pass
/// failed with a dtype mismatch.
#[test]
fn bf16_base_trains_f32_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let mut m =
        load(&ModelSource::Random("tiny".into()), DType::BF16, &Device::Cpu, 3).unwrap().model;
    let cfg = TrainConfig { dtype: whet_model::WeightDType::Bf16, ..cfg(60) };
    let (summary, events) = run(&mut m, &cfg, &dir.path().join("run"), false).unwrap();
    let first = match &events[0] {
        Event::Step { loss, .. } => *loss,
        e => panic!("{e:?}"),
    };
    let last = summary.final_loss.unwrap();
    assert!(last < 0.2 * first, "learns: {first} -> {last}");
    let bytes = std::fs::read(dir.path().join("run/adapter/adapter_model.safetensors")).unwrap();
    let (_, header) = safetensors_header(&bytes);
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    assert_eq!(header[key]["dtype"], "F32", "{header}");
}

#[test]
fn resumed_run_equals_an_uninterrupted_one_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(8);
    c.grad_accum = 2;
    c.lr_schedule = whet_train::config::Schedule::Cosine;
    c.warmup_steps = 2;
    c.lora_dropout = 0.1;
    c.eval_every = 2;
    let straight = dir.path().join("straight");
    run(&mut tiny(), &c, &straight, false).unwrap();
    // Interrupt after step 5 (as Ctrl-C does), then resume to the end.
    let split = dir.path().join("split");
    let stop = AtomicBool::new(false);
    let s = train(&mut tiny(), &data(), &c, &split, false, &stop, &World::single(), &mut |e| {
        if matches!(e, Event::Step { step: 5, .. }) {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    })
    .unwrap();
    assert_eq!((s.steps, s.stopped), (5, Some(whet_train::Stopped::Interrupted)));
    let (summary, events) = run(&mut tiny(), &c, &split, true).unwrap();
    assert_eq!(summary.steps, 8);
    assert!(
        matches!(events[0], Event::Step { step: 6, .. }),
        "continues at step 6: {:?}",
        events[0]
    );
    let a = std::fs::read(straight.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(split.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(a == b, "adapters differ");
    let metrics = std::fs::read_to_string(split.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().filter(|l| l.contains("\"loss\"")).count(),
        8,
        "each step logged once"
    );
}

/// On the CPU a batch is split into shards that run side by side, one per thread (at most one
/// per row). One shard (a one-thread pool) and four shards of one row each (a four-thread
/// pool) must train the same adapter: the same dropout masks per row (0.1 here), the loss
/// weighted by each shard's share of the trained tokens, only the summation order differs.
#[test]
fn sharded_batches_train_what_whole_batches_train() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(4);
    c.lora_dropout = 0.1;
    let adapter = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut model = tiny();
        let out = dir.path().join(format!("threads-{threads}"));
        pool.install(|| run(&mut model, &c, &out, false)).unwrap();
        model
            .lora_vars()
            .into_iter()
            .map(|(name, v)| (name, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect::<Vec<_>>()
    };
    let (whole, sharded) = (adapter(1), adapter(4));
    for ((name, a), (_, b)) in whole.iter().zip(&sharded) {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-4 * scale, "{name}: differs by {diff} (scale {scale})");
    }
    // B starts at zero: the runs trained.
    assert!(whole.iter().any(|(n, b)| n.contains("lora_B") && b.iter().any(|v| *v != 0.0)));
}

/// Validation runs the model as inference does: with adapter dropout on in training (0.5
/// here), the validation loss still equals the trained model's plain masked loss on the
/// validation examples.
#[test]
fn validation_loss_is_measured_without_dropout() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(3);
    c.lora_dropout = 0.5;
    c.eval_every = 3;
    let mut model = tiny();
    let (_, events) = run(&mut model, &c, &dir.path().join("run"), false).unwrap();
    let reported = events
        .iter()
        .find_map(|e| match e {
            Event::Eval { val_loss, .. } => Some(*val_loss),
            _ => None,
        })
        .unwrap();
    let valid = data().valid;
    let t = valid[0].ids.len();
    let ids: Vec<u32> = valid.iter().flat_map(|e| e.ids.clone()).collect();
    let mask: Vec<u8> = valid.iter().flat_map(|e| e.mask.clone()).collect();
    let cpu = Device::Cpu;
    let ids = candle_core::Tensor::from_vec(ids, (valid.len(), t), &cpu).unwrap();
    let mask = candle_core::Tensor::from_vec(mask, (valid.len(), t), &cpu).unwrap();
    let logits = model.forward(&ids, None).unwrap();
    let (loss, _) = whet_model::loss::masked_cross_entropy(&logits, &ids, &mask).unwrap();
    let want = loss.to_scalar::<f32>().unwrap() as f64;
    assert!((reported - want).abs() < 1e-5 * want, "validation loss {reported}, plain loss {want}");
}

#[test]
fn adapters_are_in_peft_format() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(2);
    c.target_modules = "q_proj,v_proj".into();
    let mut model = tiny();
    run(&mut model, &c, &dir.path().join("run"), false).unwrap();
    let adapter = dir.path().join("run/adapter");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 8);
    assert_eq!(config["lora_alpha"], 16.0);
    assert_eq!(config["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    assert_eq!(config["bias"], "none");
    assert_eq!(config["fan_in_fan_out"], false);
    assert!(config["modules_to_save"].is_null());
    assert_eq!(config["base_model_name_or_path"], "random:tiny");
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let (_, meta) = safetensors_header(&bytes);
    assert_eq!(meta["__metadata__"]["format"], "pt");
    assert_eq!(
        meta["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]["shape"],
        serde_json::json!([8, 64])
    );
    assert_eq!(
        meta["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]["shape"],
        serde_json::json!([32, 8])
    );
    // Loading it back onto a fresh base reproduces the trained model.
    let ids = candle_core::Tensor::new(&[[3u32, 9, 27, 81]], &Device::Cpu).unwrap();
    let want = model.forward(&ids, None).unwrap();
    let mut fresh = tiny();
    whet_model::adapter::load_adapter(&mut fresh, &adapter).unwrap();
    let got = fresh.forward(&ids, None).unwrap();
    let diff = (want - got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "{diff}");
}

fn safetensors_header(bytes: &[u8]) -> (usize, serde_json::Value) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (n, serde_json::from_slice(&bytes[8..8 + n]).unwrap())
}

#[test]
fn bad_settings_are_refused_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let runp = dir.path().join("run");
    let err =
        |c: &TrainConfig, resume: bool| run(&mut tiny(), c, &runp, resume).unwrap_err().to_string();
    assert!(err(&TrainConfig { target_modules: "q_proj,attn".into(), ..cfg(2) }, false)
        .contains("unknown target module `attn`"));
    assert!(err(&TrainConfig { r: 0, ..cfg(2) }, false).contains("`r` (rank) must be at least 1"));
    assert!(
        err(&TrainConfig { r: 100, ..cfg(2) }, false).contains("`r` (rank) `100` is larger than")
    );
    // A finished run is not overwritten by a new one, and a resume must match its settings.
    run(&mut tiny(), &cfg(2), &runp, false).unwrap();
    let before = std::fs::read(runp.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(err(&cfg(2), false).contains("already holds files; hint: pass --resume"));
    let e = err(&TrainConfig { learning_rate: 0.5, ..cfg(2) }, true);
    assert!(e.contains("`learning_rate` was 0.01 and is now 0.5"), "{e}");
    assert_eq!(std::fs::read(runp.join("adapter/adapter_model.safetensors")).unwrap(), before);
    let empty = TrainData::default();
    let e = train(
        &mut tiny(),
        &empty,
        &cfg(2),
        &dir.path().join("r2"),
        false,
        &AtomicBool::new(false),
        &World::single(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("the training set is empty"));
}

#[test]
fn a_diverging_run_stops_with_its_last_checkpoint_intact() {
    let dir = tempfile::tempdir().unwrap();
    let runp = dir.path().join("run");
    let c = TrainConfig {
        learning_rate: 0.9,
        max_grad_norm: 0.0,
        save_every: 1,
        steps: 200,
        ..cfg(200)
    };
    match run(&mut tiny(), &c, &runp, false) {
        Err(TrainError::Diverged { step, checkpoint, .. }) => {
            assert!(
                checkpoint.contains(&format!("step {}", step - 1)) || step == 1,
                "{checkpoint}"
            );
            assert!(runp.join("checkpoint/state.json").exists() || step == 1);
        }
        Ok((s, _)) => assert!(
            s.final_loss.is_some_and(f64::is_finite),
            "either diverges cleanly or stays finite"
        ),
        Err(e) => panic!("{e}"),
    }
}

/// A checkpoint that cannot be written (here a file squats on the temporary directory's name,
/// as a full disk would make the write fail) is an error, and the previous checkpoint survives.
#[test]
fn a_failed_checkpoint_write_keeps_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let runp = dir.path().join("run");
    let c = TrainConfig { save_every: 1, ..cfg(4) };
    let blocker = runp.join("checkpoint.tmp");
    let result = train(
        &mut tiny(),
        &data(),
        &c,
        &runp,
        false,
        &AtomicBool::new(false),
        &World::single(),
        &mut |e| {
            if matches!(e, Event::Checkpoint { step: 2 }) {
                std::fs::write(&blocker, b"in the way").unwrap();
            }
        },
    );
    let err = result.unwrap_err().to_string();
    assert!(err.contains("checkpoint.tmp"), "{err}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runp.join("checkpoint/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 2, "the step-2 checkpoint is intact");
    std::fs::remove_file(&blocker).unwrap();
    let (summary, _) = run(&mut tiny(), &c, &runp, true).unwrap();
    assert_eq!(summary.steps, 4, "and the run resumes from it");
}

/// Gradient clipping: the global norm over all tensors is measured before clipping and brought
/// down to the limit; below the limit, or with 0 (off), nothing changes.
#[test]
fn gradient_clipping_scales_to_the_global_norm() {
    use candle_core::Tensor;
    use whet_train::trainer::clip_grad_norm;
    let grads = || {
        vec![
            Tensor::new(&[3f32, 0.0], &Device::Cpu).unwrap(),
            Tensor::new(&[[0f32], [4.0]], &Device::Cpu).unwrap(),
        ]
    };
    let values = |g: &[Tensor]| -> Vec<f32> {
        g.iter().flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    };
    let mut g = grads();
    assert_eq!(clip_grad_norm(&mut g, 1.0).unwrap(), 5.0);
    let clipped = values(&g);
    let norm: f32 = clipped.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "clipped norm {norm}");
    assert!((clipped[0] - 0.6).abs() < 1e-5 && (clipped[3] - 0.8).abs() < 1e-5, "{clipped:?}");
    for max in [10.0, 0.0] {
        let mut g = grads();
        assert_eq!(clip_grad_norm(&mut g, max).unwrap(), 5.0);
        assert_eq!(values(&g), vec![3.0, 0.0, 0.0, 4.0], "max {max}");
    }
}

/// The loop clips with `max_grad_norm`: a tiny limit gives a different adapter than none
/// (Adam's first update is scale-free, so the runs part from the second step on).
#[test]
fn the_loop_clips_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = |max: f64, name: &str| {
        let c = TrainConfig { max_grad_norm: max, ..cfg(4) };
        let (_, events) = run(&mut tiny(), &c, &dir.path().join(name), false).unwrap();
        let norms: Vec<f64> = events
            .iter()
            .filter_map(|e| match e {
                Event::Step { grad_norm, .. } => Some(*grad_norm),
                _ => None,
            })
            .collect();
        assert!(norms.iter().all(|n| n.is_finite() && *n > 1e-3), "{norms:?}");
        std::fs::read(dir.path().join(name).join("adapter/adapter_model.safetensors")).unwrap()
    };
    assert_ne!(adapter(1e-4, "clipped"), adapter(0.0, "unclipped"));
}

/// Early stopping and `best/`: validation rows share the training prompts but carry other
/// answers, so the validation loss rises once the model memorises the training answers. With
/// `patience` 2 the run stops two evaluations after the best one, and `best/` holds the adapter
/// that gave the best validation loss, not the last one.
#[test]
fn patience_stops_early_and_best_keeps_the_best_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let c = TrainConfig { eval_every: 1, patience: 2, ..cfg(40) };
    let mut d = data();
    d.valid = d.train[..4].to_vec();
    for e in &mut d.valid {
        for id in &mut e.ids[6..] {
            *id = (*id + 101) % 250 + 3;
        }
    }
    let mut events = vec![];
    let summary = train(
        &mut tiny(),
        &d,
        &c,
        &run_dir,
        false,
        &AtomicBool::new(false),
        &World::single(),
        &mut |e| events.push(e.clone()),
    )
    .unwrap();
    let evals: Vec<(usize, f64, bool)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Eval { step, val_loss, best, .. } => Some((*step, *val_loss, *best)),
            _ => None,
        })
        .collect();
    let stop = summary.stopped;
    assert!(
        matches!(stop, Some(whet_train::Stopped::EarlyStop { patience: 2 })),
        "stopped: {stop:?} after {evals:?}"
    );
    assert!(summary.steps < 40, "{}", summary.steps);
    let (best_step, best_loss, _) = *evals.iter().rfind(|e| e.2).unwrap();
    assert_eq!(evals.last().unwrap().0, best_step + 2, "two evaluations without progress");
    assert!(evals.iter().all(|e| e.1 >= best_loss));
    assert_eq!(summary.best_val_loss, Some(best_loss));
    // best/ gives the best validation loss again; the final adapter a worse one.
    let val = |adapter: &str| {
        let mut m = tiny();
        whet_model::adapter::load_adapter(&mut m, &run_dir.join(adapter)).unwrap();
        let mut sum = 0.0;
        for e in &d.valid {
            let n = e.ids.len();
            let ids = candle_core::Tensor::from_vec(e.ids.clone(), (1, n), &Device::Cpu).unwrap();
            let mask = candle_core::Tensor::from_vec(e.mask.clone(), (1, n), &Device::Cpu).unwrap();
            let logits = m.forward(&ids, None).unwrap();
            let (l, k) = whet_model::loss::masked_cross_entropy(&logits, &ids, &mask).unwrap();
            sum += l.to_scalar::<f32>().unwrap() as f64 * k as f64;
        }
        sum / d.valid.iter().map(|e| e.mask[1..].iter().filter(|&&m| m == 1).count()).sum::<usize>()
            as f64
    };
    let (best_val, final_val) = (val("best"), val("adapter"));
    assert!((best_val - best_loss).abs() < 1e-3, "best/ gives {best_val}, recorded {best_loss}");
    assert!(final_val > best_val, "the final adapter is worse: {final_val} vs {best_val}");
}

/// `epochs` sets the steps from the data: 8 rows in batches of 4 with 2 micro-batches per step
/// is one step per epoch; `steps` wins when both are set.
#[test]
fn epochs_set_the_number_of_steps() {
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig { steps: 0, epochs: Some(3.0), grad_accum: 2, ..cfg(0) };
    let (summary, _) = run(&mut tiny(), &c, &dir.path().join("e"), false).unwrap();
    assert_eq!(summary.steps, 3);
    let saved = TrainConfig::from_file(&dir.path().join("e/whet.toml")).unwrap();
    assert_eq!((saved.steps, saved.epochs), (3, Some(3.0)), "whet.toml holds the resolved steps");
    let c = TrainConfig { steps: 2, epochs: Some(3.0), ..cfg(0) };
    assert_eq!(run(&mut tiny(), &c, &dir.path().join("s"), false).unwrap().0.steps, 2);
    let bad = TrainConfig { steps: 0, epochs: Some(-1.0), ..cfg(0) };
    let e = run(&mut tiny(), &bad, &dir.path().join("b"), false).unwrap_err().to_string();
    assert_eq!(e, "`epochs` = `-1`: must be positive");
}

/// Regression: a resume with other training data went on silently, with a data order and
/// steps unlike the run's. The checkpoint records the data's fingerprint; the file is named.
#[test]
fn resume_with_changed_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let c = cfg(4);
    let stop = AtomicBool::new(true); // stop (with a checkpoint) after the first step
    let mut d = data();
    d.sources.insert("train".into(), "data/x/train.jsonl".into());
    train(&mut tiny(), &d, &c, &run_dir, false, &stop, &World::single(), &mut |_| {}).unwrap();
    let resume = |d: &TrainData| {
        let no_stop = AtomicBool::new(false);
        train(&mut tiny(), d, &c, &run_dir, true, &no_stop, &World::single(), &mut |_| {})
    };
    d.train[3].ids[5] += 1;
    let e = resume(&d).unwrap_err().to_string();
    assert!(e.contains("the train data (data/x/train.jsonl) changed since the checkpoint"), "{e}");
    // The same data resumes.
    d.train[3].ids[5] -= 1;
    let s = resume(&d).unwrap();
    assert_eq!(s.steps, 4);
}

/// Regression: training cast losses and gradient norms to f64 on the device, which Metal
/// cannot do. No f64 cast may remain in the training or inference code (the CPU's f64 gradient
/// checks create f64 tensors directly instead).
#[test]
fn no_f64_cast_on_the_device() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut offenders = vec![];
    for dir in ["whet-train/src", "whet-infer/src", "whet-model/src"] {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.file_name().is_some_and(|n| n == "tests.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap_or("");
                for (i, line) in code.lines().enumerate() {
                    if line.contains("to_dtype(") && line.contains("F64") {
                        offenders.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(offenders.is_empty(), "f64 casts: {offenders:#?}");
}
