//! `whet info`: what a model is, on stdout.

use crate::args::InfoArgs;
use crate::model;
use anyhow::Result;
use candle_core::Device;
use std::io::Write;
use whet_infer::chat_template;

pub fn run(args: InfoArgs) -> Result<()> {
    let spec = model::model_spec(&args.model);
    let dtype = args.dtype.dtype();
    let m = model::load_spec(&spec, dtype, &Device::Cpu, 0)?;
    let c = &m.config;
    let mut out = std::io::stdout().lock();
    let template = chat_template(&m.tokenizer)?;
    let stop: Vec<String> = m
        .tokenizer
        .stop_ids
        .iter()
        .map(|id| format!("{} ({id})", m.tokenizer.tokenizer.id_to_token(*id).unwrap_or_default()))
        .collect();
    writeln!(out, "model:          {}", m.source)?;
    writeln!(out, "architecture:   {}", c.arch.name())?;
    writeln!(
        out,
        "parameters:     {} ({:.1}M)",
        c.num_parameters(),
        c.num_parameters() as f64 / 1e6
    )?;
    writeln!(out, "dtype:          {:?}", m.model.dtype())?;
    writeln!(out, "layers:         {}", c.num_layers)?;
    writeln!(out, "hidden size:    {} (MLP {})", c.hidden_size, c.intermediate_size)?;
    writeln!(
        out,
        "heads:          {} query, {} key/value, {} wide",
        c.num_heads, c.num_kv_heads, c.head_dim
    )?;
    writeln!(out, "vocabulary:     {}", c.vocab_size)?;
    writeln!(out, "context:        {} tokens", c.max_position_embeddings)?;
    writeln!(out, "rope:           theta {} {:?}", c.rope_theta, c.rope_scaling)?;
    if let Some(w) = c.sliding_window {
        writeln!(out, "sliding window: {w} tokens")?;
    }
    if c.qk_norm {
        writeln!(out, "q/k norm:       yes")?;
    }
    writeln!(out, "rms norm eps:   {:e}", c.rms_norm_eps)?;
    writeln!(out, "tied head:      {}", c.tie_word_embeddings)?;
    writeln!(out, "tokenizer:      {} ({} tokens)", m.tokenizer.source, m.tokenizer.vocab_size())?;
    writeln!(out, "stop tokens:    {}", stop.join(", "))?;
    if template.is_fallback() {
        writeln!(out, "chat template:  none in the model; ChatML is used")?;
    } else {
        let source = m.tokenizer.chat_template.as_deref().unwrap_or_default();
        writeln!(out, "chat template:  from {} ({} bytes)", template.origin(), source.len())?;
        if args.template {
            writeln!(out, "{source}")?;
        } else {
            let first: String = source.chars().take(100).collect();
            writeln!(out, "                {}...", first.replace('\n', "\\n"))?;
        }
    }
    Ok(())
}
