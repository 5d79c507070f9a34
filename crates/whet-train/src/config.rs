//! Training settings: one serde struct with the names users write in `train.toml` (PEFT's for
//! the adapter), defaults in one place ([`TrainConfig::default`]), validated once by
//! [`TrainConfig::validate`] into the values the loop uses.

use serde::{Deserialize, Serialize};
use std::path::Path;
use whet_model::lora::LoraConfig;
use whet_model::{DeviceSpec, Quantization, WeightDType};

/// Everything that shapes a run, each setting defined once: its name here is its key in
/// `train.toml` and `RUN_DIR/whet.toml` (PEFT's names for the adapter), its flag of
/// `whet train` (the `long` name where it differs), and its default is
/// [`TrainConfig::default`]'s, which `--help` shows. Written to `RUN_DIR/whet.toml` before the
/// first step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Base model (a GGUF file, a Hugging Face directory, a hub id or `random:NAME`).
    #[arg(short, long, env = "WHET_MODEL", default_value_t = defaults().model)]
    pub model: String,
    /// Dataset (file, directory, or `whet data prepare` output).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub data: String,
    /// Base weight dtype.
    #[arg(long, value_enum, default_value_t = defaults().dtype)]
    pub dtype: WeightDType,
    /// Device: auto, cpu, cuda, cuda:N, metal.
    #[arg(long, default_value_t = defaults().device)]
    pub device: DeviceSpec,
    /// QLoRA: keep the frozen base block-quantized while training, `q8_0` (a quarter of f32's
    /// memory, near-lossless) or `q4_0` (an eighth), at the cost of quantization noise in the
    /// frozen weights [default: the base stays in --dtype].
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, value_enum, value_name = "TYPE")]
    pub quantize_base: Option<Quantization>,
    /// LoRA rank.
    #[arg(long = "rank", value_name = "RANK", default_value_t = defaults().r)]
    pub r: usize,
    /// LoRA alpha; the update is scaled by alpha/rank.
    #[arg(long = "alpha", value_name = "ALPHA", default_value_t = defaults().lora_alpha)]
    pub lora_alpha: f64,
    /// LoRA dropout.
    #[arg(long = "dropout", value_name = "P", default_value_t = defaults().lora_dropout)]
    pub lora_dropout: f64,
    /// Wrapped modules: comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,
    /// or all-linear.
    #[arg(long = "targets", value_name = "MODULES", default_value_t = defaults().target_modules)]
    pub target_modules: String,
    /// rsLoRA scaling, alpha/sqrt(rank); --no-rslora turns it off.
    #[arg(long = "rslora")]
    pub use_rslora: bool,
    /// Train on from this adapter (a run's adapter/ directory, or a PEFT adapter) instead of
    /// a fresh one, as SFT -> DPO does: its rank, alpha and targets are the run's, and the
    /// reference model of a preference objective is a frozen copy of it rather than the bare
    /// base [default: a fresh adapter].
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "DIR")]
    pub init_adapter: Option<String>,
    /// Peak learning rate.
    #[arg(long, default_value_t = defaults().learning_rate)]
    pub learning_rate: f64,
    /// Learning-rate decay after warmup.
    #[arg(long, value_enum, default_value_t = defaults().lr_schedule)]
    pub lr_schedule: Schedule,
    /// Linear warmup steps.
    #[arg(long, default_value_t = defaults().warmup_steps)]
    pub warmup_steps: usize,
    /// Optimizer steps (or as many as --epochs takes, when only that is given); 0 with
    /// `epochs` set means "as many as `epochs` takes", resolved by
    /// [`TrainConfig::resolve_steps`] before the run starts.
    #[arg(long, default_value_t = defaults().steps)]
    pub steps: usize,
    /// Passes over the training data (fractions allowed): sets the steps from the data size,
    /// batch size and accumulation. --steps wins when both are given.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Examples (or packed rows) per micro-batch.
    #[arg(long, default_value_t = defaults().batch_size)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = defaults().grad_accum)]
    pub grad_accum: usize,
    /// Longest example in tokens.
    #[arg(long, default_value_t = defaults().max_seq_len)]
    pub max_seq_len: usize,
    /// Pack several examples per row (the default when --data was prepared with --pack);
    /// --no-pack turns it off.
    #[arg(long)]
    pub pack: bool,
    /// Gradient checkpointing: keep only each layer's input and recompute the layer in the
    /// backward pass (about a third more compute for most of the activation memory);
    /// --no-grad-checkpoint turns it off.
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// Which tokens the loss covers.
    #[arg(long, value_enum, default_value_t = defaults().train_on)]
    pub train_on: whet_data::TrainOn,
    /// Record format of the data files (`auto`: detected per file from its first record).
    #[arg(long, value_enum, default_value_t = defaults().format)]
    pub format: whet_data::FormatChoice,
    /// Examples over --max-seq-len: `truncate` them or `drop` them.
    #[arg(long, value_enum, default_value_t = defaults().overlong)]
    pub overlong: whet_data::Overlong,
    /// Set a chat-template variable, as transformers' `apply_chat_template(NAME=VALUE)` does
    /// (repeatable; the value is JSON when it parses as JSON, else a string).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[arg(long = "template-var", value_name = "NAME=VALUE")]
    pub template_vars: Vec<String>,
    /// Share of train held out when there is no validation file.
    #[arg(long, default_value_t = defaults().valid_fraction)]
    pub valid_fraction: f64,
    /// AdamW weight decay (decoupled).
    #[arg(long, default_value_t = defaults().weight_decay)]
    pub weight_decay: f64,
    /// AdamW beta1.
    #[arg(long = "adam-beta1", default_value_t = defaults().beta1)]
    pub beta1: f64,
    /// AdamW beta2.
    #[arg(long = "adam-beta2", default_value_t = defaults().beta2)]
    pub beta2: f64,
    /// AdamW epsilon.
    #[arg(long = "adam-eps", default_value_t = defaults().eps)]
    pub eps: f64,
    /// Clip the global gradient norm to this (0 = off).
    #[arg(long, default_value_t = defaults().max_grad_norm)]
    pub max_grad_norm: f64,
    /// Validate every this many steps (0 = only at the end).
    #[arg(long, default_value_t = defaults().eval_every)]
    pub eval_every: usize,
    /// Checkpoint every this many steps (0 = only at the end).
    #[arg(long, default_value_t = defaults().save_every)]
    pub save_every: usize,
    /// Stop after this many evaluations without a better validation loss (0 = never).
    #[arg(long, default_value_t = defaults().patience)]
    pub patience: usize,
    /// Seed of adapter initialisation, data order and dropout.
    #[arg(long, default_value_t = defaults().seed)]
    pub seed: u64,
    /// What the loss is: `sft` learns the answers of the data; `dpo`, `ipo`, `simpo` and
    /// `orpo` learn from pairs of a chosen and a rejected answer (`prompt`, `chosen`,
    /// `rejected` records), `kto` from single answers marked desirable or not (`prompt`,
    /// `completion`, `label` records), each as TRL defines it.
    #[arg(long, value_enum, default_value_t = defaults().objective)]
    pub objective: ObjectiveKind,
    /// Preference objectives: TRL's beta — for DPO, IPO and KTO how far the adapter may move
    /// from the reference (IPO's tau), for SimPO the reward scale, for ORPO the weight (lambda)
    /// of the odds-ratio term.
    #[arg(long, default_value_t = defaults().beta)]
    pub beta: f64,
    /// DPO: Robust DPO's probability that a pair's preference is flipped, in [0, 0.5) (TRL's
    /// `loss_type="robust"`); SimPO: its label smoothing.
    #[arg(long, default_value_t = defaults().label_smoothing)]
    pub label_smoothing: f64,
    /// DPO: add this weight times the chosen answers' cross-entropy (RPO; TRL's
    /// `loss_type=["sigmoid", "sft"]` with `loss_weights=[1, A]`), which keeps DPO from
    /// lowering the chosen answers' likelihood along with the rejected ones' (0: off).
    #[arg(long, value_name = "A", default_value_t = defaults().rpo_alpha)]
    pub rpo_alpha: f64,
    /// SimPO: the target reward margin gamma (TRL's `simpo_gamma`).
    #[arg(long = "gamma", default_value_t = defaults().simpo_gamma)]
    pub simpo_gamma: f64,
    /// KTO: the weight of the desirable answers' losses (TRL's `desirable_weight`).
    #[arg(long, default_value_t = defaults().desirable_weight)]
    pub desirable_weight: f64,
    /// KTO: the weight of the undesirable answers' losses (TRL's `undesirable_weight`); with
    /// more desirable than undesirable answers, KTO's paper advises a weight ratio
    /// `desirable * n_desirable / (undesirable * n_undesirable)` in [1, 4/3].
    #[arg(long, default_value_t = defaults().undesirable_weight)]
    pub undesirable_weight: f64,
    /// DPO, IPO and KTO: compute the reference model's log-probabilities of every answer once
    /// before training (a forward over the data) instead of a reference forward in every step
    /// (KTO's KL estimate, on answers paired anew in every batch, still runs the reference).
    #[arg(long)]
    pub precompute_ref: bool,
}

/// `--objective`: what the training loss is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveKind {
    /// Supervised fine-tuning: the cross-entropy of the data's answers.
    #[default]
    Sft,
    /// Direct preference optimisation (Robust DPO with --label-smoothing).
    Dpo,
    /// Identity preference optimisation.
    Ipo,
    /// Simple preference optimisation (no reference model).
    Simpo,
    /// Odds-ratio preference optimisation (no reference model).
    Orpo,
    /// Kahneman-Tversky optimisation, on unpaired answers marked desirable or not.
    Kto,
}

impl ObjectiveKind {
    /// The name flags and files use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Dpo => "dpo",
            Self::Ipo => "ipo",
            Self::Simpo => "simpo",
            Self::Orpo => "orpo",
            Self::Kto => "kto",
        }
    }

    /// Whether it learns from preferences (pairs, or answers marked desirable or not) rather
    /// than by imitating answers.
    pub fn is_preference(self) -> bool {
        self != Self::Sft
    }

    /// Whether it trains on pairs of a chosen and a rejected answer.
    pub fn is_paired(self) -> bool {
        matches!(self, Self::Dpo | Self::Ipo | Self::Simpo | Self::Orpo)
    }
}

/// The one place every default is written.
fn defaults() -> TrainConfig {
    TrainConfig::default()
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: whet_model::DEFAULT_MODEL.into(),
            data: String::new(),
            dtype: WeightDType::F32,
            device: DeviceSpec::Auto,
            quantize_base: None,
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            target_modules: "q_proj,v_proj".into(),
            use_rslora: false,
            learning_rate: 2e-4,
            lr_schedule: Schedule::Cosine,
            warmup_steps: 10,
            steps: 200,
            epochs: None,
            batch_size: 4,
            grad_accum: 1,
            max_seq_len: 512,
            pack: false,
            grad_checkpoint: false,
            train_on: whet_data::TrainOn::All,
            format: whet_data::FormatChoice::Auto,
            overlong: whet_data::Overlong::Truncate,
            template_vars: vec![],
            valid_fraction: 0.1,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            eval_every: 50,
            save_every: 100,
            patience: 0,
            seed: 0,
            objective: ObjectiveKind::Sft,
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            rpo_alpha: 0.0,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            precompute_ref: false,
            init_adapter: None,
        }
    }
}

/// The learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Flat.
    Constant,
    /// Linear decay to zero at the last step.
    Linear,
    /// Cosine decay to zero at the last step.
    Cosine,
}

/// A configuration problem, naming the field and value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl TrainConfig {
    /// Read a `train.toml`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        toml::from_str(&text)
            .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.message())))
    }

    /// Read a `train.toml` and say whether it sets `steps` itself (for `epochs`, which sets
    /// the steps only when nothing else does).
    pub fn from_file_with_steps(path: &Path) -> Result<(Self, bool), ConfigError> {
        let cfg = Self::from_file(path)?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.message())))?;
        Ok((cfg, table.contains_key("steps")))
    }

    /// With `steps` 0 and `epochs` set: the steps `epochs` passes over `rows` training rows
    /// take, at `batch_size` rows per micro-batch and `grad_accum` micro-batches per step
    /// (rounded up, at least 1).
    pub fn resolve_steps(&mut self, rows: usize) {
        if let (0, Some(epochs)) = (self.steps, self.epochs) {
            let per_epoch = rows.div_ceil(self.batch_size.max(1)) as f64;
            let steps = (epochs * per_epoch / self.grad_accum.max(1) as f64).ceil();
            self.steps = (steps as usize).max(1);
        }
    }

    /// As TOML, for `whet.toml`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Check every value once; returns the LoRA settings and the schedule.
    pub fn validate(&self) -> Result<(LoraConfig, Schedule), ConfigError> {
        let bad = |field: &str, value: String, want: &str| {
            Err(ConfigError(format!("`{field}` = `{value}`: {want}")))
        };
        if self.data.is_empty() {
            return Err(ConfigError("no training data; hint: pass --data DIR".into()));
        }
        let lora = LoraConfig::new(
            self.r,
            self.lora_alpha,
            self.lora_dropout,
            &self.target_modules,
            self.use_rslora,
        )
        .map_err(|e| ConfigError(e.to_string()))?;
        let schedule = self.lr_schedule;
        if !(self.learning_rate > 0.0 && self.learning_rate < 1.0) {
            return bad("learning_rate", self.learning_rate.to_string(), "must be in (0, 1)");
        }
        if let Some(e) = self.epochs {
            if !(e > 0.0 && e.is_finite()) {
                return bad("epochs", e.to_string(), "must be positive");
            }
        }
        let steps = if self.epochs.is_some() && self.steps == 0 { 1 } else { self.steps };
        for (field, v) in
            [("steps", steps), ("batch_size", self.batch_size), ("grad_accum", self.grad_accum)]
        {
            if v == 0 {
                return bad(field, "0".into(), "must be at least 1");
            }
        }
        let o = self.objective;
        if o.is_preference() {
            if !(self.beta > 0.0 && self.beta.is_finite()) {
                return bad("beta", self.beta.to_string(), "must be positive");
            }
            if !(0.0..0.5).contains(&self.label_smoothing) {
                return bad(
                    "label_smoothing",
                    self.label_smoothing.to_string(),
                    "must be in [0, 0.5)",
                );
            }
            if !(self.rpo_alpha >= 0.0 && self.rpo_alpha.is_finite()) {
                return bad("rpo_alpha", self.rpo_alpha.to_string(), "must be 0 or more");
            }
            for (field, w) in [
                ("desirable_weight", self.desirable_weight),
                ("undesirable_weight", self.undesirable_weight),
            ] {
                if !(w > 0.0 && w.is_finite()) {
                    return bad(field, w.to_string(), "must be positive");
                }
            }
            if o == ObjectiveKind::Kto && self.batch_size < 2 {
                return bad(
                    "batch_size",
                    self.batch_size.to_string(),
                    "--objective kto estimates its KL term from each batch's answers paired with other rows' prompts, which needs at least 2 rows a batch",
                );
            }
            if self.pack {
                return bad(
                    "pack",
                    "true".into(),
                    &format!(
                        "--objective {} trains on scored answers, which are not packed; pass --no-pack",
                        o.name()
                    ),
                );
            }
        }
        // A setting of another objective is refused, not silently ignored.
        for (field, value, set, applies) in [
            ("beta", self.beta.to_string(), self.beta != defaults().beta, o.is_preference()),
            (
                "label_smoothing",
                self.label_smoothing.to_string(),
                self.label_smoothing != 0.0,
                matches!(o, ObjectiveKind::Dpo | ObjectiveKind::Simpo),
            ),
            (
                "simpo_gamma",
                self.simpo_gamma.to_string(),
                self.simpo_gamma != defaults().simpo_gamma,
                o == ObjectiveKind::Simpo,
            ),
            (
                "rpo_alpha",
                self.rpo_alpha.to_string(),
                self.rpo_alpha != 0.0,
                o == ObjectiveKind::Dpo,
            ),
            (
                "desirable_weight",
                self.desirable_weight.to_string(),
                self.desirable_weight != defaults().desirable_weight,
                o == ObjectiveKind::Kto,
            ),
            (
                "undesirable_weight",
                self.undesirable_weight.to_string(),
                self.undesirable_weight != defaults().undesirable_weight,
                o == ObjectiveKind::Kto,
            ),
            (
                "precompute_ref",
                "true".to_string(),
                self.precompute_ref,
                matches!(o, ObjectiveKind::Dpo | ObjectiveKind::Ipo | ObjectiveKind::Kto),
            ),
        ] {
            if set && !applies {
                return bad(field, value, &format!("has no meaning for --objective {}", o.name()));
            }
        }
        if self.max_seq_len < 2 {
            return bad("max_seq_len", self.max_seq_len.to_string(), "must be at least 2");
        }
        for (field, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(field, v.to_string(), "must be in [0, 1)");
            }
        }
        if !(self.eps > 0.0) || self.weight_decay < 0.0 || self.max_grad_norm < 0.0 {
            return bad(
                "eps/weight_decay/max_grad_norm",
                format!("{}/{}/{}", self.eps, self.weight_decay, self.max_grad_norm),
                "eps must be positive, the others non-negative",
            );
        }
        Ok((lora, schedule))
    }

    /// `self` with the settings named in `given` (field names, as clap's argument ids are)
    /// taken from `flags`: the flags a user typed win over a config file, and the file over
    /// the defaults.
    pub fn with_flags(&self, flags: &TrainConfig, given: &[String]) -> Result<Self, ConfigError> {
        let bad = |e: String| ConfigError(format!("internal error merging flags: {e}"));
        let mut merged = toml::Table::try_from(self).map_err(|e| bad(e.to_string()))?;
        let typed = toml::Table::try_from(flags).map_err(|e| bad(e.to_string()))?;
        for id in given {
            match typed.get(id) {
                Some(v) => drop(merged.insert(id.clone(), v.clone())),
                None => drop(merged.remove(id)),
            }
        }
        merged.try_into().map_err(|e: toml::de::Error| bad(e.to_string()))
    }

    /// The first field in which `self` and `other` differ, with both values.
    pub fn first_difference(&self, other: &TrainConfig) -> Option<(String, String, String)> {
        let a = toml::Table::try_from(self).ok()?;
        let b = toml::Table::try_from(other).ok()?;
        for (k, v) in &a {
            if b.get(k) != Some(v) {
                let theirs = b.get(k).map(|x| x.to_string()).unwrap_or_else(|| "(absent)".into());
                return Some((k.clone(), v.to_string(), theirs));
            }
        }
        None
    }
}

/// Learning rate at `step` (0-based): linear warmup, then the schedule down to zero.
pub fn learning_rate(
    schedule: Schedule,
    peak: f64,
    warmup: usize,
    total: usize,
    step: usize,
) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak * (1.0 - progress),
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_decay() {
        let lr = |s, step| learning_rate(s, 1.0, 10, 110, step);
        assert_eq!(lr(Schedule::Cosine, 0), 0.1);
        assert_eq!(lr(Schedule::Cosine, 9), 1.0);
        assert_eq!(lr(Schedule::Cosine, 10), 1.0);
        assert!((lr(Schedule::Cosine, 60) - 0.5).abs() < 1e-12);
        assert!((lr(Schedule::Linear, 60) - 0.5).abs() < 1e-12);
        assert_eq!(lr(Schedule::Constant, 100), 1.0);
        assert!(lr(Schedule::Cosine, 109) < 0.01);
    }

    /// Flags given win over the file, the file over the defaults, and a flag left at its
    /// default does not undo the file.
    #[test]
    fn given_flags_win_over_the_file_and_others_keep_it() {
        use clap::{Args, FromArgMatches};
        let file: TrainConfig =
            toml::from_str("data = \"d\"\nr = 4\nlearning_rate = 0.001\npack = true\nepochs = 2.0")
                .unwrap();
        let cmd = TrainConfig::augment_args(clap::Command::new("t"));
        let m = cmd.try_get_matches_from(["t", "--rank", "16", "--lr-schedule", "linear"]).unwrap();
        let flags = TrainConfig::from_arg_matches(&m).unwrap();
        let given: Vec<String> = m
            .ids()
            .filter(|id| {
                m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|id| id.to_string())
            .collect();
        // clap also names the struct's own group; ids that are no setting change nothing.
        assert!(given.contains(&"r".to_string()) && given.contains(&"lr_schedule".to_string()));
        let c = file.with_flags(&flags, &given).unwrap();
        assert_eq!((c.r, c.lr_schedule), (16, Schedule::Linear));
        assert_eq!((c.learning_rate, c.pack, c.epochs), (0.001, true, Some(2.0)));
        assert_eq!(c.batch_size, TrainConfig::default().batch_size);
    }

    #[test]
    fn validation_names_the_field_and_value() {
        // A value that is not one of a setting's names is refused where the file is read.
        let e = toml::from_str::<TrainConfig>("data = \"d\"\nlr_schedule = \"step\"").unwrap_err();
        assert!(
            e.message()
                .contains("unknown variant `step`, expected one of `constant`, `linear`, `cosine`"),
            "{e}"
        );
        let c = TrainConfig {
            data: "d".into(),
            target_modules: "q_proj,qkv".into(),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("unknown target module `qkv`"));
        let c = TrainConfig { data: "d".into(), r: 0, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("`r` (rank) must be at least 1"));
        let a = TrainConfig { data: "d".into(), ..Default::default() };
        let b = TrainConfig { learning_rate: 1e-3, ..a.clone() };
        assert_eq!(
            a.first_difference(&b),
            Some(("learning_rate".into(), "0.0002".into(), "0.001".into()))
        );
        let toml = a.to_toml();
        assert_eq!(toml::from_str::<TrainConfig>(&toml).unwrap(), a);
    }
}
