//! `whet adapter info`: what an adapter directory holds, read from its files alone; `whet
//! merge`: the base model with an adapter folded in, written out.

use crate::args::{AdapterCheckArgs, AdapterConvertArgs, AdapterInfoArgs, MergeArgs};
use crate::output::{Output, Shape};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// A GGUF file out: an existing one is replaced (with --overwrite) only if it is a GGUF file.
const GGUF: Shape = Shape::File { magic: b"GGUF" };
use std::io::Write;
use whet_model::adapter::PeftAdapter;

pub fn info(a: AdapterInfoArgs) -> Result<()> {
    let adapter = PeftAdapter::read(&a.dir)?;
    let path = a.dir.join("adapter_model.safetensors");
    // Read and checked as loading reads them: a truncated file or a NaN is refused here too.
    let tensors = whet_model::adapter::read_tensors(&a.dir)?;
    let bytes = std::fs::metadata(&path).map(|m| m.len() as usize).unwrap_or(0);
    // Per module kind (`q_proj`): how many layers, and the ranks the A matrices have.
    let mut kinds: BTreeMap<String, (usize, Vec<usize>)> = BTreeMap::new();
    let mut params = 0usize;
    for (name, view) in &tensors {
        params += view.elem_count();
        let Some(module) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let kind = module.rsplit('.').next().unwrap_or(module).to_string();
        let entry = kinds.entry(kind).or_default();
        entry.0 += 1;
        let r = view.dims().first().copied().unwrap_or(0);
        if !entry.1.contains(&r) {
            entry.1.push(r);
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "adapter:        {}", a.dir.display())?;
    writeln!(out, "base model:     {}", adapter.base_model.as_deref().unwrap_or("(not recorded)"))?;
    let scaling = if adapter.use_rslora { "alpha/sqrt(r), rsLoRA" } else { "alpha/r" };
    writeln!(out, "rank, alpha:    r {}, alpha {} ({scaling})", adapter.r, adapter.lora_alpha)?;
    writeln!(out, "targets:        {}", adapter.describe_targets())?;
    for (kind, (layers, ranks)) in &mut kinds {
        ranks.sort_unstable();
        let ranks: Vec<String> = ranks.iter().map(usize::to_string).collect();
        writeln!(out, "  {kind:<13} {layers} layers, rank {}", ranks.join("/"))?;
    }
    writeln!(out, "parameters:     {params} ({:.2}M)", params as f64 / 1e6)?;
    writeln!(out, "size:           {:.1} KB", bytes as f64 / 1024.0)?;
    Ok(())
}

pub fn merge(a: MergeArgs) -> Result<()> {
    let quant = match a.quant.as_str() {
        "f32" => candle_core::quantized::GgmlDType::F32,
        "f16" => candle_core::quantized::GgmlDType::F16,
        "q8_0" => candle_core::quantized::GgmlDType::Q8_0,
        "q4_0" => candle_core::quantized::GgmlDType::Q4_0,
        other => bail!("unknown --quant `{other}`; expected f32, f16, q8_0 or q4_0"),
    };
    match a.format.as_str() {
        "hf" if a.quant != "f32" => {
            bail!("--quant applies to `--format gguf`; a Hugging Face directory takes --dtype")
        }
        "hf" | "gguf" => {}
        other => bail!("unknown --format `{other}`; expected hf or gguf"),
    }
    let adapter = match a.model.adapter.as_slice() {
        [one] if !one.contains('=') => std::path::PathBuf::from(one),
        [] => bail!("--adapter is required: the adapter to merge"),
        _ => bail!("merge takes one plain `--adapter DIR`"),
    };
    let spec = crate::model::model_spec(&a.model.model);
    let gguf_base = match crate::model::source(&spec)? {
        whet_model::ModelSource::Gguf(path) => Some(whet_model::io::gguf::GgufFile::open(&path)?),
        _ if a.format == "gguf" => bail!(
            "`--format gguf` keeps the base GGUF's tokenizer and metadata, and `{spec}` is not a GGUF file\nhint: merge to a Hugging Face directory (`--format hf`) and convert it with llama.cpp's convert_hf_to_gguf.py"
        ),
        _ => None,
    };
    let shape = if a.format == "gguf" { GGUF } else { Shape::Dir };
    let inputs = crate::model::input_paths(&a.model);
    let inputs: Vec<(&str, &Path)> = inputs.iter().map(|(f, p)| (*f, p.as_path())).collect();
    let out = Output::plan(&a.out, shape, "merge", a.overwrite, &inputs)?;
    // model::load merges the adapter into the weights.
    let (m, _) = crate::model::load(&a.model, 0)?;
    let weights = m.model.named_weights().context("cannot write the merged weights")?;
    if let (Some(src), "gguf") = (&gguf_base, a.format.as_str()) {
        whet_model::io::export::save_gguf(src, &m.config, &weights, quant, out.staging()?)?;
        let out = out.commit()?;
        println!("merged {} into {}: {} ({})", adapter.display(), m.source, out.display(), a.quant);
        return Ok(());
    }
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        weights.into_iter().collect();
    whet_model::io::export::save_hf_dir(out.staging()?, &m.config, &tensors, &m.tokenizer, 1)?;
    out.commit()?;
    println!("merged {} into {}: {}", adapter.display(), m.source, a.out.display());
    Ok(())
}

pub fn convert(a: AdapterConvertArgs) -> Result<()> {
    if a.to != "gguf" {
        bail!("`--to {}` is not implemented; whet converts adapters `--to gguf` (llama.cpp)", a.to);
    }
    let spec = crate::model::model_spec(&a.model);
    // The adapter's own refusals (fields whet does not implement) come first.
    PeftAdapter::read(&a.dir)?;
    let mut inputs = vec![("the adapter", a.dir.as_path())];
    inputs.extend(Some(Path::new(&spec)).filter(|m| m.exists()).map(|m| ("--model", m)));
    let out = Output::plan(&a.out, GGUF, "adapter convert", a.overwrite, &inputs)?;
    // The configuration alone (architecture, head counts): no weights are loaded.
    let source = crate::model::source(&spec)?;
    let cfg = whet_model::io::config_only(&source)
        .with_context(|| format!("cannot read the configuration of `{spec}`"))?;
    let n = whet_model::adapter::adapter_to_gguf(&a.dir, &cfg, out.staging()?)?;
    let out = out.commit()?;
    println!("wrote {} ({n} adapted modules, {} base)", out.display(), cfg.arch.name());
    Ok(())
}

pub fn check(a: AdapterCheckArgs) -> Result<()> {
    use whet_model::adapter::Finding;
    let findings = whet_model::adapter::check_for(&a.dir, a.runtime)?;
    let source = a.runtime.rules();
    let mut out = std::io::stdout().lock();
    if findings.is_empty() {
        writeln!(out, "{}: {} runs it as PEFT does (rules: {source})", a.dir.display(), a.runtime)?;
        return Ok(());
    }
    for f in &findings {
        match f {
            Finding::Rejects(why) => writeln!(out, "rejects:     {why}")?,
            Finding::Miscomputes(why) => writeln!(out, "miscomputes: {why}")?,
        }
    }
    out.flush()?;
    bail!("{} would not run as trained on {} (rules: {source})", a.dir.display(), a.runtime)
}
