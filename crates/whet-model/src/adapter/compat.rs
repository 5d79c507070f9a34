//! What other runtimes would refuse, or compute differently from PEFT, for an adapter.

use super::{read_tensors, PeftAdapter, Result};
use std::path::Path;

/// What another runtime does with an adapter, for `whet adapter check`.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    /// The runtime refuses to load it.
    Rejects(String),
    /// The runtime loads it and computes something else, without a word.
    Miscomputes(String),
}

/// The runtimes [`check_for`] knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    /// whet itself.
    Whet,
    /// PEFT, the format's reference.
    Peft,
    /// vLLM.
    Vllm,
    /// llama.cpp, through its `convert_lora_to_gguf.py`.
    #[value(name = "llama.cpp")]
    LlamaCpp,
    /// mistral.rs.
    Mistralrs,
}

impl Runtime {
    /// The name `--for` takes.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Whet => "whet",
            Runtime::Peft => "peft",
            Runtime::Vllm => "vllm",
            Runtime::LlamaCpp => "llama.cpp",
            Runtime::Mistralrs => "mistralrs",
        }
    }

    /// Where the rules [`check_for`] applies were read from.
    pub fn rules(self) -> &'static str {
        match self {
            Runtime::Whet => "this reader",
            Runtime::Peft => "the format's reference: PEFT reads every field it writes",
            Runtime::Vllm => "vLLM's `PEFTHelper` (one scaling `lora_alpha / r`, or `/ sqrt(r)` with rsLoRA; default `--max-lora-rank` 16)",
            Runtime::LlamaCpp => "llama.cpp's `convert_lora_to_gguf.py` (one `lora_alpha`, over each tensor's rank)",
            Runtime::Mistralrs => "mistral.rs `mistralrs-core/src/lora` (reads only `r`, `lora_alpha`, `lora_dropout` and `target_modules` as a list; scale `lora_alpha / r`; every targeted module of every layer must have tensors of rank `r`)",
        }
    }
}

impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What `runtime` will refuse or silently compute differently for the adapter in `dir`; an
/// empty list when it runs it as PEFT does.
pub fn check_for(dir: &Path, runtime: Runtime) -> Result<Vec<Finding>> {
    let (_, c) = super::AdapterConfig::read(dir)?;
    let set = |k: &str| c.is_set(k);
    let mut out = vec![];
    // Every runtime reads the tensors: a truncated or non-finite file runs nowhere.
    if let Err(e) = read_tensors(dir) {
        out.push(Finding::Rejects(e.to_string()));
    }
    match runtime {
        Runtime::Whet => {
            if let Err(e) = PeftAdapter::read(dir) {
                out.push(Finding::Rejects(e.to_string()));
            }
        }
        Runtime::Peft => {}
        Runtime::Vllm => {
            for (k, why) in [("use_dora", "DoRA"), ("modules_to_save", "`modules_to_save`")] {
                if set(k) {
                    out.push(Finding::Rejects(format!("{why} (`{k}`)")));
                }
            }
            if set("bias") {
                out.push(Finding::Rejects(
                    "`bias` other than `none` (unless started with bias enabled)".into(),
                ));
            }
            let ranks = std::iter::once(c.r.unwrap_or(0) as u64)
                .chain(c.rank_pattern.iter().flat_map(|p| p.values().filter_map(|r| r.as_u64())));
            if let Some(r) = ranks.max().filter(|&r| r > 16) {
                out.push(Finding::Rejects(format!("rank {r} is above the default `--max-lora-rank` 16 (start vLLM with `--max-lora-rank {r}` or more)")));
            }
            for k in ["rank_pattern", "alpha_pattern"] {
                if set(k) {
                    out.push(Finding::Miscomputes(format!(
                        "`{k}` is ignored: every module is scaled by the one `lora_alpha / r`"
                    )));
                }
            }
        }
        Runtime::LlamaCpp => {
            if set("use_dora") {
                out.push(Finding::Rejects(
                    "DoRA: its `lora_magnitude_vector` tensors are not LoRA A/B matrices".into(),
                ));
            }
            if set("modules_to_save") {
                out.push(Finding::Rejects(
                    "`modules_to_save`: fully trained modules are not LoRA A/B matrices".into(),
                ));
            }
            for (k, what) in
                [("use_rslora", "rsLoRA's `alpha / sqrt(r)`"), ("alpha_pattern", "`alpha_pattern`")]
            {
                if set(k) {
                    out.push(Finding::Miscomputes(format!(
                        "{what} is lost by convert_lora_to_gguf.py, which scales by `lora_alpha / r`; hint: `whet adapter convert --to gguf` folds the true scales in"
                    )));
                }
            }
        }
        Runtime::Mistralrs => {
            if matches!(c.target_modules, Some(super::config::ModuleSpec::Pattern(_))) {
                out.push(Finding::Rejects(
                    "`target_modules` as a regular expression: mistral.rs reads a list of names"
                        .into(),
                ));
            }
            if set("rank_pattern") {
                out.push(Finding::Rejects(
                    "`rank_pattern`: mistral.rs expects every adapter tensor at rank `r`, so tensors of other ranks do not load".into(),
                ));
            }
            for k in ["layers_to_transform", "exclude_modules"] {
                if set(k) {
                    out.push(Finding::Rejects(format!(
                        "`{k}`: mistral.rs wraps the targeted modules of every layer and stops at the first without tensors"
                    )));
                }
            }
            let ignored = [
                ("use_rslora", "rsLoRA's `lora_alpha / sqrt(r)` becomes `lora_alpha / r`"),
                ("alpha_pattern", "`alpha_pattern` is ignored: every module gets `lora_alpha / r`"),
                ("use_dora", "DoRA's magnitude vectors are ignored: it runs as plain LoRA"),
                (
                    "modules_to_save",
                    "`modules_to_save` is ignored: the saved modules keep the base weights",
                ),
                ("bias", "trained biases (`bias` other than `none`) are ignored"),
                ("lora_bias", "`lora_bias` is ignored"),
            ];
            for (k, what) in ignored {
                if set(k) {
                    out.push(Finding::Miscomputes(what.into()));
                }
            }
        }
    }
    Ok(out)
}
