//! Turning `--model/--device/--dtype` into a loaded model, and the hints that follow errors.

use crate::args::{ModelArgs, SamplingArgs};
use anyhow::{Context, Result};
use candle_core::Device;
use whet_infer::{GenerateConfig, SamplingConfig};
use whet_model::{LoadedModel, ModelSource, DEFAULT_MODEL, FETCH_HINT};

/// The `--model` value, or the default model's path.
pub fn model_spec(model: &Option<String>) -> String {
    model.clone().unwrap_or_else(|| DEFAULT_MODEL.to_string())
}

/// Load the model named by `args` on the requested device.
pub fn load(args: &ModelArgs, seed: u64) -> Result<(LoadedModel, Device)> {
    load_with(args, seed, true)
}

/// As [`load`]; with `merge_one` false, even a single `--adapter DIR` stays unmerged, named
/// after its directory (the server selects adapters per request).
pub fn load_with(args: &ModelArgs, seed: u64, merge_one: bool) -> Result<(LoadedModel, Device)> {
    let device = args.device.open()?;
    let dtype = args.dtype.dtype();
    let quantize = args.quantize.map(whet_model::Quantization::ggml);
    let spec = model_spec(&args.model);
    let mut model = load_spec(&spec, dtype, &device, seed)?;
    let specs = args.adapter.iter().map(|s| AdapterSpec::parse(s)).collect::<Result<Vec<_>>>()?;
    match specs.as_slice() {
        [] => {}
        // One plain adapter: merged, so generation runs at base speed.
        [one] if merge_one && one.name.is_none() && one.weight.is_none() => {
            let adapter = whet_model::adapter::load_adapter(&mut model.model, &one.dir)
                .with_context(|| format!("cannot apply the adapter in {}", one.dir.display()))?;
            warn_base(&adapter, &one.dir, &spec);
            model.model.merge_lora()?;
            model.source = format!("{} + adapter {}", model.source, one.dir.display());
        }
        several => {
            for s in several {
                let name = s.name.clone().unwrap_or_else(|| default_name(&s.dir));
                let weight = s.weight.unwrap_or(1.0);
                let adapter = whet_model::adapter::load_named_adapter(
                    &mut model.model,
                    &name,
                    weight,
                    &s.dir,
                )
                .with_context(|| format!("cannot apply the adapter in {}", s.dir.display()))?;
                warn_base(&adapter, &s.dir, &spec);
                model.source =
                    format!("{} + adapter {name} ({}) x{weight}", model.source, s.dir.display());
            }
        }
    }
    if let Some(q) = quantize {
        model.model.quantize(q).context("cannot quantize the model")?;
        model.source = format!("{}, linear layers quantized to {q:?}", model.source);
    }
    tracing::info!("loaded {} on {}", model.source, whet_model::device_name(&device));
    Ok((model, device))
}

/// The local files and directories `args` reads (the model, when it is a path, and every
/// adapter), by flag: what an `--out` may never replace.
pub fn input_paths(args: &ModelArgs) -> Vec<(&'static str, std::path::PathBuf)> {
    let mut paths = vec![];
    let spec = model_spec(&args.model);
    if std::path::Path::new(&spec).exists() {
        paths.push(("--model", spec.into()));
    }
    for a in &args.adapter {
        if let Ok(spec) = AdapterSpec::parse(a) {
            paths.push(("--adapter", spec.dir));
        }
    }
    paths
}

/// An adapter's name when none is given: its directory's name (`runs/style/adapter` is
/// `style`: a run directory's adapter lives in `adapter/`).
fn default_name(dir: &std::path::Path) -> String {
    let mut parts = dir.components().rev().filter_map(|c| c.as_os_str().to_str());
    match parts.next() {
        Some("adapter") | Some("best") => parts.next().unwrap_or("adapter").to_string(),
        Some(n) if n != "." && n != ".." => n.to_string(),
        _ => dir.display().to_string(),
    }
}

/// One `--adapter` value: `DIR`, or `NAME=DIR[:WEIGHT]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub name: Option<String>,
    pub dir: std::path::PathBuf,
    pub weight: Option<f64>,
}

impl AdapterSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        let (name, rest) = match spec.split_once('=') {
            Some((n, rest)) if !n.is_empty() && !n.contains('/') => (Some(n.to_string()), rest),
            _ => (None, spec),
        };
        let (dir, weight) = match rest.rsplit_once(':') {
            Some((dir, text)) if name.is_some() => {
                let w: f64 = text.parse().map_err(|_| {
                    anyhow::anyhow!(
                        "--adapter `{spec}`: weight `{text}` is not a number (NAME=DIR[:WEIGHT])"
                    )
                })?;
                // The weight scales f32 products: NaN, infinities and values past f32's range
                // would turn every answer into nothing.
                anyhow::ensure!(
                    (w as f32).is_finite(),
                    "--adapter `{spec}`: weight `{text}` is not a finite f32 number (NAME=DIR[:WEIGHT])"
                );
                (dir, Some(w))
            }
            _ => (rest, None),
        };
        anyhow::ensure!(!dir.is_empty(), "--adapter `{spec}`: no directory (NAME=DIR[:WEIGHT])");
        Ok(Self { name, dir: dir.into(), weight })
    }
}

/// A different base in the adapter's config is worth a word, not a refusal. Names are compared
/// by their last component: a checkout moved elsewhere, or a hub id against its downloaded
/// directory, is the same base.
fn warn_base(adapter: &whet_model::adapter::PeftAdapter, dir: &std::path::Path, spec: &str) {
    let last = |s: &str| {
        let s = s.trim_end_matches('/');
        s.rsplit('/').next().unwrap_or(s).to_string()
    };
    if let Some(base) = adapter.base_model.as_deref().filter(|b| last(b) != last(spec)) {
        tracing::warn!(
            "the adapter in {} was trained on `{base}`, and is applied to `{spec}`",
            dir.display()
        );
    }
}

/// Load a model from a `--model` value.
pub fn load_spec(
    spec: &str,
    dtype: candle_core::DType,
    device: &Device,
    seed: u64,
) -> Result<LoadedModel> {
    load_spec_quantized(spec, dtype, device, seed, None)
}

/// As [`load_spec`], the linear layers quantized to `quantize` while loading (QLoRA's base).
pub fn load_spec_quantized(
    spec: &str,
    dtype: candle_core::DType,
    device: &Device,
    seed: u64,
    quantize: Option<candle_core::quantized::GgmlDType>,
) -> Result<LoadedModel> {
    whet_model::load_quantized(&source(spec)?, dtype, device, seed, quantize)
        .with_context(|| format!("cannot load model `{spec}`"))
}

/// Classify a `--model` value; the default model missing gets its own error (and hint).
pub fn source(spec: &str) -> Result<ModelSource> {
    if spec == DEFAULT_MODEL && !std::path::Path::new(spec).exists() {
        return Err(DefaultModelMissing.into());
    }
    Ok(ModelSource::parse(spec)?)
}

/// The default model has not been fetched yet.
#[derive(Debug, thiserror::Error)]
#[error("the default model `{DEFAULT_MODEL}` is not here (run whet from the repository root)")]
pub struct DefaultModelMissing;

/// A `hint:` line for errors whose fix is known.
pub fn hint_for(err: &anyhow::Error) -> Option<String> {
    if err.downcast_ref::<DefaultModelMissing>().is_some() {
        return Some(format!("fetch it with `{FETCH_HINT}`, or pass --model PATH"));
    }
    None
}

/// `--temperature` and `--top-p` in range.
pub fn check_sampling(temperature: f64, top_p: f64) -> Result<()> {
    anyhow::ensure!(temperature >= 0.0, "--temperature must be at least 0, got `{temperature}`");
    anyhow::ensure!(top_p > 0.0 && top_p <= 1.0, "--top-p must be in (0, 1], got `{top_p}`");
    Ok(())
}

/// Generation settings from the sampling flags.
pub fn generate_config(s: &SamplingArgs) -> Result<GenerateConfig> {
    check_sampling(s.temperature, s.top_p)?;
    anyhow::ensure!(
        s.repetition_penalty > 0.0,
        "--repetition-penalty must be positive, got `{}`",
        s.repetition_penalty
    );
    anyhow::ensure!(s.max_tokens > 0, "--max-tokens must be positive, got `0`");
    // An empty stop string matches at once: an empty answer that looks like success.
    anyhow::ensure!(
        s.stop.iter().all(|x| !x.is_empty()),
        "--stop `` is empty; it would stop before the first token"
    );
    Ok(GenerateConfig {
        max_tokens: s.max_tokens,
        stop: s.stop.clone(),
        stop_at_eos: true,
        sampling: SamplingConfig {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            repetition_penalty: s.repetition_penalty,
            repeat_last_n: 64,
            seed: s.seed,
        },
    })
}
