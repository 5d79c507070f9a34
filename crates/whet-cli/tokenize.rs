//! `whet tokenize`: what the model sees — each token's id and text on stdout.

use crate::args::TokenizeArgs;
use crate::model;
use anyhow::{Context, Result};
use std::io::{Read, Write};

pub fn run(a: TokenizeArgs) -> Result<()> {
    let text = match a.text.as_deref() {
        Some(t) if t != "-" => t.to_string(),
        _ => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("cannot read the text from stdin")?;
            s
        }
    };
    let spec = model::model_spec(&a.model);
    let tokenizer = whet_model::io::tokenizer_only(&model::source(&spec)?)
        .with_context(|| format!("cannot load the tokenizer of `{spec}`"))?;
    let ids = tokenizer.encode(&text)?;
    let mut out = std::io::stdout().lock();
    if a.ids {
        let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
        writeln!(out, "{}", ids.join(" "))?;
        return Ok(());
    }
    for &id in &ids {
        // The token's own spelling in the vocabulary (`Ġ2` for " 2"), then the text it stands for.
        let piece = tokenizer.tokenizer.id_to_token(id).unwrap_or_default();
        let text = tokenizer.decode(&[id])?;
        writeln!(out, "{id:>7}  {text:?}  {piece}")?;
    }
    eprintln!("{} tokens ({})", ids.len(), tokenizer.source);
    Ok(())
}
