//! The layers of the one Llama implementation, each a struct with `load`, `forward` and the
//! `backward` its training pass runs (llm.c keeps forward and backward side by side): the
//! token embedding ([`embedding`]), the frozen or quantized linear layer with its LoRA wrapper
//! ([`linear`]), RMSNorm ([`norm`]), rotary embeddings ([`rope`]), grouped-query attention
//! ([`attention`]) and the SwiGLU MLP ([`mlp`]). Checkpoint tensor names appear only in their
//! `vb.pp(...)` calls.

pub(crate) mod attention;
pub(crate) mod embedding;
pub(crate) mod linear;
pub(crate) mod mlp;
pub(crate) mod norm;
pub(crate) mod rope;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use std::sync::{Arc, Mutex};

/// Settings of one training forward pass (see [`crate::Llama::hidden_train`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrainPass {
    /// Seed of this pass's adapter-dropout masks (the trainer draws one per micro-batch).
    pub dropout_seed: u64,
    /// Index of the pass's first row in the whole batch: each row's dropout masks come from the
    /// seed and the row's index, so a batch split into shards draws the masks the whole batch
    /// would.
    pub first_row: usize,
    /// Gradient checkpointing per block: keep only each block's input and recompute the block in
    /// the backward pass.
    pub grad_checkpoint: bool,
}

/// What a forward pass is for: inference (`train` none) uses candle's fused kernels; training
/// keeps what the hand-written backward passes need and applies adapter dropout. A ragged
/// batch (`rows`) lays several sequences end to end in one row, each with its own adapters.
/// A reference pass (`reference`) leaves the trained adapter out: the frozen base (with its
/// named adapters at their weights) is the reference model of DPO, KTO and GRPO, at no cost
/// in weights.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ctx<'a> {
    pub(crate) train: Option<TrainPass>,
    pub(crate) rows: Option<&'a [RowSpan]>,
    pub(crate) reference: bool,
}

/// One sequence of a ragged batch: its tokens `start..start + len` of the flattened row, and
/// the named adapters (id, weight) applied to them.
#[derive(Debug, Clone)]
pub(crate) struct RowSpan {
    pub(crate) start: usize,
    pub(crate) len: usize,
    pub(crate) adapters: Vec<(usize, f64)>,
    /// Rotation tables of the row's positions and its mask (`None`: every key visible).
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) mask: Option<Tensor>,
}

impl Ctx<'_> {
    pub(crate) fn training(&self) -> bool {
        self.train.is_some()
    }
}

/// Adapter gradients: (variable, gradient).
pub(crate) type Grads = Vec<(Tensor, Tensor)>;

/// The adapter gradients of one training forward pass. The blocks compute them in their own
/// backward passes, out of sight of candle's `Tensor::backward`, so a plain `loss.backward()`
/// would miss them: [`GradCollector::backward`] runs candle's pass and adds them in.
#[derive(Debug, Clone, Default)]
pub struct GradCollector(Arc<Mutex<Grads>>);

impl GradCollector {
    pub(crate) fn extend(&self, grads: Grads) -> Result<()> {
        crate::ops::lock(&self.0)?.extend(grads);
        Ok(())
    }

    /// Gradients of `loss` (computed from this pass's output) for every variable, the
    /// adapters included.
    pub fn backward(self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let collected = std::mem::take(&mut *crate::ops::lock(&self.0)?);
        for (var, grad) in collected {
            let sum = match grads.remove(&var) {
                Some(prev) => (prev + grad)?,
                None => grad,
            };
            grads.insert(&var, sum);
        }
        Ok(grads)
    }
}
