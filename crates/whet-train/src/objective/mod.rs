//! Training objectives behind one seam: an [`Objective`] turns some rows of a batch into a
//! loss (and named metrics), and the loop in [`crate::trainer`] does everything else the same
//! way for every objective: gradient accumulation, shards and ranks, clipping, validation,
//! early stopping, checkpoints and exact resume. A new objective is a file here plus its tests.
//!
//! - [`sft`]: supervised fine-tuning, the masked next-token cross-entropy.

pub mod sft;

use crate::error::TrainError;
use candle_core::{Device, Tensor};
use whet_model::{GradCollector, Llama, TrainPass};

pub use sft::Sft;

/// One row of a batch: an example, or several packed ones with their positions and segments.
pub(crate) struct Row {
    /// Token ids.
    pub(crate) ids: Vec<u32>,
    /// 1 where the loss applies.
    pub(crate) mask: Vec<u8>,
    /// Packed rows: each token's position within its example, and its example's index.
    pub(crate) packed: Option<(Vec<u32>, Vec<u32>)>,
}

/// What an objective computed over some rows of a batch.
pub(crate) struct Loss {
    /// The loss: a mean over the rows' units (see [`Objective::units`]).
    pub(crate) loss: Tensor,
    /// With a training pass, the collector whose backward gives the adapter gradients.
    pub(crate) collector: Option<GradCollector>,
    /// The objective's own metrics, each a mean over the same units (`rewards/margins`, ...).
    pub(crate) metrics: Vec<(&'static str, f64)>,
    /// Tokens run through the model (padding not counted).
    pub(crate) tokens: usize,
}

/// A training objective.
pub(crate) trait Objective: Sync {
    /// What the loss is a mean over in `rows`: trained tokens for SFT, pairs for preference
    /// objectives. A part of a batch (a shard, a rank's rows) is weighted by its share of the
    /// batch's units, so that the parts add up to the loss of the whole batch.
    fn units(&self, rows: &[&Row]) -> usize;

    /// The loss of `rows`. With `pass`, a training forward whose collector comes back for the
    /// backward; without, inference (validation). `rows` hold at least one unit.
    fn loss(
        &self,
        model: &Llama,
        rows: &[&Row],
        pass: Option<&TrainPass>,
        device: &Device,
    ) -> Result<Loss, TrainError>;
}
