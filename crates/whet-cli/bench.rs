//! `whet bench generate`: prefill and decode speed with the load average beside them.

use crate::args::BenchGenerateArgs;
use crate::model;
use anyhow::Result;
use std::io::Write;
use whet_infer::bench::{bench_generate, load_average, median};
use whet_train::ObjectiveKind;

pub fn generate(args: BenchGenerateArgs) -> Result<()> {
    anyhow::ensure!(
        args.runs > 0 && args.tokens > 1 && args.prompt_tokens > 0,
        "--runs, --tokens (>1) and --prompt-tokens must be positive"
    );
    let load_before = load_average();
    let (m, device) = model::load(&args.model, 0)?;
    let runs = bench_generate(&m.model, &m.tokenizer, args.prompt_tokens, args.tokens, args.runs)?;
    let prefill = median(runs.iter().map(|r| r.prefill_tps).collect());
    let decode = median(runs.iter().map(|r| r.decode_tps).collect());
    let mut out = std::io::stdout().lock();
    writeln!(out, "model:      {}", m.source)?;
    writeln!(out, "{}", device_line(&device))?;
    writeln!(
        out,
        "runs:       {} (+1 warm-up), prompt {} tokens, {} generated",
        args.runs, args.prompt_tokens, args.tokens
    )?;
    writeln!(out, "prefill:    {prefill:.1} tokens/s (median)")?;
    writeln!(
        out,
        "decode:     {decode:.1} tokens/s (median; runs: {})",
        runs.iter().map(|r| format!("{:.1}", r.decode_tps)).collect::<Vec<_>>().join(", ")
    )?;
    // What bounds decoding on a CPU: every token reads these weights from memory once.
    let bytes = m.model.decode_weight_bytes() as f64;
    writeln!(
        out,
        "weights:    {:.2} MB read per decoded token, {:.1} GB/s at the median decode speed",
        bytes / 1e6,
        bytes * decode / 1e9
    )?;
    writeln!(out, "{}", whet_infer::bench::load_line(load_before))?;
    Ok(())
}

pub fn train(args: crate::args::BenchTrainArgs) -> Result<()> {
    use rand::{Rng, SeedableRng};
    anyhow::ensure!(
        args.steps > 0 && args.seq_len > 1 && args.batch_size > 0,
        "--steps, --seq-len and --batch-size must be positive"
    );
    let load_before = load_average();
    // Under mpirun: the same global batch, split across the ranks.
    let mut world = whet_train::World::from_launch(false)?;
    let device = world.rank_device(args.device.open()?, args.device)?;
    world.attach_device(&device)?;
    let dtype = args.dtype.dtype();
    let quantize = args.quantize_base.map(whet_model::Quantization::ggml);
    let mut m = model::load_spec_quantized(&args.model, dtype, &device, 0, quantize)?;
    let mut cfg = whet_train::TrainConfig {
        model: args.model.clone(),
        data: "synthetic".into(),
        r: args.rank,
        target_modules: args.targets.clone(),
        steps: args.steps + 1,
        batch_size: args.batch_size,
        max_seq_len: args.seq_len,
        grad_checkpoint: args.grad_checkpoint,
        quantize_base: args.quantize_base.clone(),
        pack: args.pack,
        eval_every: 0,
        save_every: 0,
        objective: args.objective,
        precompute_ref: args.precompute_ref,
        ..Default::default()
    };
    cfg.validate()?;
    let data = match &args.data {
        // Real examples, tokenized, masked and (with --pack) packed as `whet train` does.
        Some(dir) => {
            cfg.data = dir.display().to_string();
            let text = crate::data::ModelText::from_tokenizer(m.tokenizer.clone(), &[])?;
            let mut data = crate::train::load_data(&cfg, &text)?;
            anyhow::ensure!(!data.train.is_empty(), "{}: no training examples", dir.display());
            data.valid.clear();
            data
        }
        None => {
            anyhow::ensure!(!args.pack, "--pack needs --data: random rows are all full already");
            let o = args.objective;
            anyhow::ensure!(
                args.prompt_tokens < args.seq_len
                    && (o == ObjectiveKind::Sft || args.prompt_tokens > 0),
                "--prompt-tokens {}: {}\nhint: --prompt-tokens {}",
                args.prompt_tokens,
                if args.prompt_tokens >= args.seq_len {
                    "leaves no answer in a row of --seq-len tokens"
                } else {
                    "a preference objective's answers follow a prompt"
                },
                args.seq_len / 2
            );
            let vocab = m.config.vocab_size as u32;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
            let n = args.batch_size * (args.steps + 1);
            let (p, t) = (args.prompt_tokens, args.seq_len);
            let mask: Vec<u8> = (0..t).map(|i| u8::from(i >= p)).collect();
            let mut draw =
                |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(3..vocab)).collect() };
            let train = (0..n)
                .map(|i| {
                    let prompt = draw(p);
                    let row = |answer: Vec<u32>| whet_data::Tokenized {
                        ids: prompt.iter().copied().chain(answer).collect(),
                        mask: mask.clone(),
                        ..Default::default()
                    };
                    let mut e = row(draw(t - p));
                    if o.is_paired() {
                        e.rejected = Some(Box::new(row(draw(t - p))));
                    } else if o == ObjectiveKind::Kto {
                        e.desirable = Some(i % 2 == 0);
                    }
                    e
                })
                .collect();
            whet_train::TrainData { train, ..Default::default() }
        }
    };
    // What the loop will run (the same draw of rows), described below and saved for a peer.
    let batches = if args.data.is_some() || args.save_rows.is_some() {
        whet_train::trainer::micro_batches(&data, &cfg)
    } else {
        vec![]
    };
    if let (Some(path), true) = (&args.save_rows, world.is_root()) {
        save_rows(path, &batches)?;
    }
    let dir = tempfile::tempdir()?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut speeds, mut reduce) = (vec![], vec![]);
    whet_train::train(
        &mut m.model,
        &data,
        &cfg,
        &dir.path().join("run"),
        false,
        &stop,
        &world,
        &mut |e| {
            if let whet_train::Event::Step { step, tokens_per_sec, secs, allreduce_secs, .. } = e {
                if *step > 1 {
                    speeds.push(*tokens_per_sec);
                    reduce.push((*allreduce_secs, *secs));
                }
            }
        },
    )?;
    let root = world.is_root();
    let size = world.size();
    world.finish();
    if !root {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "model:      {}", m.source)?;
    writeln!(out, "{}", device_line(&device))?;
    writeln!(
        out,
        "lora:       r{} on {}, batch {} x {} tokens{}",
        args.rank,
        args.targets,
        args.batch_size,
        args.seq_len,
        if args.grad_checkpoint { ", gradient checkpointing" } else { "" }
    )?;
    if args.objective != ObjectiveKind::Sft || args.prompt_tokens > 0 {
        writeln!(
            out,
            "objective:  {}{}{}",
            args.objective.name(),
            if args.objective.is_paired() {
                " on pairs (two sides of --seq-len tokens each)"
            } else {
                ""
            },
            if args.precompute_ref { ", reference precomputed" } else { "" },
        )?;
        if args.data.is_none() {
            writeln!(
                out,
                "rows:       the first {} tokens of each are prompt (not trained)",
                args.prompt_tokens
            )?;
        }
    }
    if let Some(dir) = &args.data {
        let rows: Vec<_> = batches.iter().flatten().collect();
        let tokens: usize = rows.iter().map(|r| r.ids.len()).sum();
        let trained: usize = rows.iter().map(|r| r.mask.iter().filter(|&&v| v == 1).count()).sum();
        writeln!(
            out,
            "data:       {}{}, {:.0} tokens a row on average, {:.0}% of them trained",
            dir.display(),
            if args.pack { " (packed)" } else { "" },
            tokens as f64 / rows.len().max(1) as f64,
            100.0 * trained as f64 / tokens.max(1) as f64
        )?;
    }
    writeln!(
        out,
        "train:      {:.1} tokens/s (median of {} steps after 1 warm-up; {})",
        median(speeds.clone()),
        speeds.len(),
        speeds.iter().map(|s| format!("{s:.0}")).collect::<Vec<_>>().join(", ")
    )?;
    if size > 1 {
        let (r, s): (f64, f64) = reduce.iter().fold((0.0, 0.0), |(a, b), (r, s)| (a + r, b + s));
        let n = reduce.len().max(1) as f64;
        writeln!(
            out,
            "ranks:      {} (MPI); all-reduce {:.1} ms per step, {:.2}% of a step (rank 0, after every rank checked in)",
            size,
            1e3 * r / n,
            100.0 * r / s.max(1e-9)
        )?;
    }
    let whose = if size > 1 { " (rank 0)" } else { "" };
    writeln!(out, "peak RSS:   {:.0} MB{whose}", whet_train::trainer::peak_rss_mb())?;
    writeln!(out, "{}", whet_infer::bench::load_line(load_before))?;
    Ok(())
}

/// The micro-batches of a benchmark run, one JSON line each (`{"rows": [{"ids", "mask",
/// "positions"}, ...]}`), for scripts/bench_train_torch.py --rows: the peer then trains on the
/// same tokens. Written whole to a temporary file and renamed, so a failed run leaves none.
fn save_rows(path: &std::path::Path, batches: &[Vec<whet_train::trainer::BatchRow>]) -> Result<()> {
    use anyhow::Context;
    let mut text = String::new();
    for rows in batches {
        text += &serde_json::to_string(&serde_json::json!({ "rows": rows }))?;
        text.push('\n');
    }
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// `device:` line of the reports: where it ran, with how many threads.
fn device_line(device: &candle_core::Device) -> String {
    format!(
        "device:     {} ({} threads)",
        whet_model::device_name(device),
        candle_core::utils::get_num_threads()
    )
}

pub fn serve(args: crate::args::BenchServeArgs) -> Result<()> {
    use whet_serve::bench::{bench_serve, percentile};
    anyhow::ensure!(
        args.streams > 0 && args.requests > 0 && args.tokens > 1 && args.max_batch > 0,
        "--streams, --requests, --max-batch and --tokens (>1) must be positive"
    );
    let load_before = load_average();
    let (m, device) = model::load_with(&args.model, 0, false)?;
    let source = m.source.clone();
    let cfg = whet_serve::ServeConfig {
        model_id: "bench".into(),
        api_key: None,
        adapter_dir: None,
        max_concurrent: args.requests.max(args.streams),
        max_tokens: args.tokens,
        max_body_bytes: 1 << 20,
        engine: whet_infer::EngineConfig {
            max_batch: args.max_batch,
            ..whet_infer::EngineConfig::default()
        },
        defaults: whet_infer::GenerateConfig::default(),
        net: whet_serve::NetConfig::default(),
        allowed_hosts: vec![],
        cors_origins: vec![],
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let rounds = [1, args.streams, args.requests];
    let r = runtime.block_on(bench_serve(m.model, m.tokenizer, cfg, &rounds, args.tokens))?;
    let (one, many, burst) = (&r[0], &r[1], &r[2]);
    let mut out = std::io::stdout().lock();
    writeln!(out, "model:      {source}")?;
    writeln!(out, "{}", device_line(&device))?;
    writeln!(
        out,
        "requests:   streamed chat over loopback, {} tokens each, batch up to {}",
        args.tokens, args.max_batch
    )?;
    writeln!(out, "1 stream:   {:.1} tokens/s", one.tokens_per_sec())?;
    writeln!(
        out,
        "{} streams: {:.1} tokens/s aggregate ({:.2}x one stream)",
        args.streams,
        many.tokens_per_sec(),
        many.tokens_per_sec() / one.tokens_per_sec().max(1e-9)
    )?;
    writeln!(
        out,
        "{} requests: {:.2} requests/s, {:.1} tokens/s; latency p50 {:.2} s, p95 {:.2} s; first token p50 {:.2} s, p95 {:.2} s",
        args.requests,
        burst.requests_per_sec(),
        burst.tokens_per_sec(),
        percentile(&burst.total, 50.0),
        percentile(&burst.total, 95.0),
        percentile(&burst.ttft, 50.0),
        percentile(&burst.ttft, 95.0),
    )?;
    writeln!(out, "{}", whet_infer::bench::load_line(load_before))?;
    Ok(())
}
