//! `whet bench generate`: prefill and decode speed with the load average beside them.

use crate::args::BenchGenerateArgs;
use crate::model;
use anyhow::Result;
use std::io::Write;
use whet_infer::bench::{bench_generate, load_average, median};

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
    let fmt_load = |l: Option<f64>| l.map_or("n/a".to_string(), |l| format!("{l:.2}"));
    writeln!(out, "model:      {}", m.source)?;
    writeln!(
        out,
        "device:     {} ({} threads)",
        whet_model::device_name(&device),
        candle_core::utils::get_num_threads()
    )?;
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
    writeln!(
        out,
        "load avg:   {} before, {} after (1 min)",
        fmt_load(load_before),
        fmt_load(load_average())
    )?;
    Ok(())
}
