//! `whet info`: what a model is, on stdout.

use crate::args::InfoArgs;
use crate::model;
use anyhow::Result;
use candle_core::Device;
use whet_infer::chat_template;

pub fn run(args: InfoArgs) -> Result<()> {
    let spec = model::model_spec(&args.model);
    let dtype = whet_model::parse_dtype(&args.dtype)?;
    let m = model::load_spec(&spec, dtype, &Device::Cpu, 0)?;
    let c = &m.config;
    let template = chat_template(&m.tokenizer)?;
    let stop: Vec<String> = m
        .tokenizer
        .stop_ids
        .iter()
        .map(|id| format!("{} ({id})", m.tokenizer.tokenizer.id_to_token(*id).unwrap_or_default()))
        .collect();
    println!("model:          {}", m.source);
    println!("architecture:   {}", c.arch.name());
    println!("parameters:     {} ({:.1}M)", c.num_parameters(), c.num_parameters() as f64 / 1e6);
    println!("dtype:          {:?}", m.model.dtype());
    println!("layers:         {}", c.num_layers);
    println!("hidden size:    {} (MLP {})", c.hidden_size, c.intermediate_size);
    println!(
        "heads:          {} query, {} key/value, {} wide",
        c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!("vocabulary:     {}", c.vocab_size);
    println!("context:        {} tokens", c.max_position_embeddings);
    println!("rope:           theta {} {:?}", c.rope_theta, c.rope_scaling);
    println!("rms norm eps:   {:e}", c.rms_norm_eps);
    println!("tied head:      {}", c.tie_word_embeddings);
    println!("tokenizer:      {} ({} tokens)", m.tokenizer.source, m.tokenizer.vocab_size());
    println!("stop tokens:    {}", stop.join(", "));
    if template.is_fallback() {
        println!("chat template:  none in the model; ChatML is used");
    } else {
        let source = m.tokenizer.chat_template.as_deref().unwrap_or_default();
        println!("chat template:  from {} ({} bytes)", template.origin(), source.len());
        if args.template {
            println!("{source}");
        } else {
            let first: String = source.chars().take(100).collect();
            println!("                {}...", first.replace('\n', "\\n"));
        }
    }
    Ok(())
}
