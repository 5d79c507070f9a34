//! `whet generate`: one prompt in, streamed text out on stdout.

use crate::args::GenerateArgs;
use crate::model;
use anyhow::{Context, Result};
use std::io::{Read, Write};
use whet_infer::{chat_template, Message, Session};

pub fn run(args: GenerateArgs) -> Result<()> {
    if let Some(file) = &args.batch_file {
        return crate::batch::run(&args, file);
    }
    let cfg = model::generate_config(&args.sampling)?;
    let prompt = match args.prompt.as_deref() {
        Some(p) if p != "-" => p.to_string(),
        _ => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("cannot read the prompt from stdin")?;
            s
        }
    };
    let (m, _device) = model::load(&args.model, args.sampling.seed)?;
    let text = if args.chat {
        let mut template = chat_template(&m.tokenizer)?;
        template.set_vars(&args.template.template_var).map_err(anyhow::Error::msg)?;
        let mut messages = vec![];
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", prompt));
        template.render(&messages, true)?
    } else {
        prompt
    };
    let ids = m.tokenizer.encode(&text)?;
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let g = Session::new(&m.model, &m.tokenizer).generate(&ids, &cfg, |piece| {
        if write_err.is_none() {
            if let Err(e) = stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush()) {
                write_err = Some(e);
            }
        }
    })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    writeln!(stdout)?;
    if args.stats {
        eprintln!(
            "prompt: {} tokens, {:.1} tokens/s; generated: {} tokens, {:.1} tokens/s; stop: {:?}",
            g.prefill_tokens,
            g.prefill_tokens as f64 / g.prefill_secs.max(1e-9),
            g.ids.len(),
            g.ids.len().saturating_sub(1) as f64 / g.decode_secs.max(1e-9),
            g.stop_reason
        );
    }
    Ok(())
}
