//! What a training run reports as it goes ([`Event`]) and when it ends ([`Summary`]).

/// Progress, for the command line to display.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An optimizer step finished.
    Step {
        /// 1-based step.
        step: usize,
        /// Mean training loss over the step's tokens.
        loss: f64,
        /// Learning rate used.
        lr: f64,
        /// Global gradient norm before clipping.
        grad_norm: f64,
        /// Tokens run through the model in this step (prompts included, padding not).
        tokens: usize,
        /// Seconds the step took.
        secs: f64,
        /// `tokens / secs`.
        tokens_per_sec: f64,
        /// Seconds of the step spent summing gradients across ranks once all had arrived (0 in
        /// one process).
        allreduce_secs: f64,
        /// Peak resident memory so far, in MB.
        peak_mb: f64,
        /// The objective's own metrics for the step, in its order (none for SFT).
        metrics: Vec<(String, f64)>,
    },
    /// A validation pass finished.
    Eval {
        /// Step it followed.
        step: usize,
        /// Mean validation loss.
        val_loss: f64,
        /// Whether it is the best so far (the best adapter was saved).
        best: bool,
        /// The objective's own metrics over the validation set (none for SFT).
        metrics: Vec<(String, f64)>,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Step it holds.
        step: usize,
    },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Steps completed.
    pub steps: usize,
    /// Last training loss; `None` when no step ran (a resumed run that was already finished).
    pub final_loss: Option<f64>,
    /// Best validation loss, if validated.
    pub best_val_loss: Option<f64>,
    /// Why it stopped before its last step, if it did.
    pub stopped: Option<Stopped>,
}

/// Why a run stopped before its last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// No better validation loss in `patience` evaluations.
    EarlyStop {
        /// The evaluations waited.
        patience: usize,
    },
    /// Asked to stop (Ctrl-C, SIGTERM); the checkpoint holds the last step.
    Interrupted,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::EarlyStop { patience } => {
                write!(f, "early stop: no better validation loss in {patience} evaluations")
            }
            Self::Interrupted => write!(f, "interrupted"),
        }
    }
}
