//! Training objectives behind one seam: an [`Objective`] turns some rows of a batch into a
//! loss (and named metrics), and the loop in [`crate::trainer`] does everything else the same
//! way for every objective: gradient accumulation, shards and ranks, clipping, validation,
//! early stopping, checkpoints and exact resume. A new objective is a file here plus its tests.
//!
//! - [`sft`]: supervised fine-tuning, the masked next-token cross-entropy.
//! - [`preference`]: DPO, IPO, SimPO and ORPO on pairs of a chosen and a rejected answer.
//! - [`kto`]: KTO on single answers marked desirable or not.

pub mod kto;
pub mod preference;
pub mod sft;

use crate::error::TrainError;
use candle_core::{Device, Tensor};
use whet_model::{GradCollector, Llama, TrainPass};

pub use kto::Kto;
pub use preference::{pair_logps, Preference, PreferenceLoss};
pub use sft::Sft;

/// One row of a batch: an example, or several packed ones with their positions and segments.
pub(crate) struct Row {
    /// Token ids.
    pub(crate) ids: Vec<u32>,
    /// 1 where the loss applies.
    pub(crate) mask: Vec<u8>,
    /// Packed rows: each token's position within its example, and its example's index.
    pub(crate) packed: Option<(Vec<u32>, Vec<u32>)>,
    /// A preference pair's rejected side (ids and mask); `ids`/`mask` are the chosen side.
    pub(crate) rejected: Option<(Vec<u32>, Vec<u8>)>,
    /// Of an unpaired answer (KTO's data), whether it is desirable.
    pub(crate) desirable: Option<bool>,
    /// The reference model's log-probabilities of the chosen and rejected answers (of an
    /// unpaired answer, the first), when computed before training.
    pub(crate) reference: Option<[f64; 2]>,
}

/// What an objective computed over a part of a batch: the part's share of the batch's loss, so
/// that the parts (shards, ranks) add up to the loss of the whole batch.
pub(crate) struct Loss {
    /// This part's share of the batch's loss (the batch's loss is a mean over its units, see
    /// [`Objective::units`]).
    pub(crate) loss: Tensor,
    /// With a training pass, the collector whose backward gives the adapter gradients.
    pub(crate) collector: Option<GradCollector>,
    /// The objective's own metrics (`rewards/margins`, ...), each this part's share of the
    /// batch's value.
    pub(crate) metrics: Vec<(&'static str, f64)>,
    /// Tokens run through the model (padding not counted).
    pub(crate) tokens: usize,
}

/// A training objective.
pub(crate) trait Objective: Sync {
    /// What the loss is a mean over in `rows`: trained tokens for SFT, pairs for preference
    /// objectives.
    fn units(&self, rows: &[&Row]) -> usize;

    /// The names of the metrics [`Objective::loss`] returns, in its order: every rank reduces
    /// the same list, whatever rows it had.
    fn metric_names(&self) -> Vec<&'static str> {
        vec![]
    }

    /// Work on every row once before the first step (the reference model's log-probabilities
    /// for `--precompute-ref`), in batches of `batch` rows; by default nothing.
    fn prepare(
        &self,
        _model: &Llama,
        _rows: &mut [Row],
        _batch: usize,
        _device: &Device,
    ) -> Result<(), TrainError> {
        Ok(())
    }

    /// How many batch-wide sums [`Objective::batch_sums`] gives: values every part's loss needs
    /// from all rows of the batch (KTO's KL estimate). None by default.
    fn batch_sum_count(&self) -> usize {
        0
    }

    /// The share of the batch-wide sums that the rows `part` of the batch `whole` make: the
    /// loop adds the shares of every shard and rank, and hands the totals to each part's
    /// [`Objective::loss`]. Computed without a graph.
    fn batch_sums(
        &self,
        _model: &Llama,
        _part: &[&Row],
        _whole: &[&Row],
        _device: &Device,
    ) -> Result<Vec<f64>, TrainError> {
        Ok(vec![])
    }

    /// The share of the loss of the batch `whole` that its rows `part` make (a shard, a rank's
    /// rows, or all of them), given the batch's [`Objective::batch_sums`]. With `pass`, a
    /// training forward whose collector comes back for the backward; without, inference
    /// (validation). `part` holds at least one unit.
    fn loss(
        &self,
        model: &Llama,
        part: &[&Row],
        whole: &[&Row],
        sums: &[f64],
        pass: Option<&TrainPass>,
        device: &Device,
    ) -> Result<Loss, TrainError>;
}

#[cfg(test)]
mod tests;
