//! Training failures.

/// Training failures.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A bad setting.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Model or adapter trouble.
    #[error(transparent)]
    Model(#[from] whet_model::Error),
    /// A tensor operation failed.
    #[error("training step failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The run directory is unusable.
    #[error("{0}")]
    Run(String),
    /// A failure of the distributed job (a rank dead or hung, ranks that disagree).
    #[error("{0}")]
    Dist(String),
    /// A failure every rank meets alike: rank 0 reports it, the others exit quietly.
    #[error("{msg}")]
    OnRank {
        /// The rank that met it.
        rank: usize,
        /// What happened.
        msg: String,
    },
    /// Loss became NaN or infinite.
    #[error("the loss became {loss} at step {step}; stopped. The last checkpoint ({checkpoint}) is intact; hint: lower --learning-rate")]
    Diverged {
        /// The offending loss.
        loss: f64,
        /// The step.
        step: usize,
        /// Which checkpoint survives.
        checkpoint: String,
    },
}
