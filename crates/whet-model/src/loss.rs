//! The training loss: mean cross-entropy over trained tokens only (mlx-lm `default_loss`).

use candle_core::{DType, Result, Tensor, D};

/// Mean next-token cross-entropy of `logits` `[B, T, V]` against `ids` `[B, T]`, over the
/// positions whose `mask` `[B, T]` is 1: token `t` is predicted by the logits at `t - 1`, so
/// prompt and padding tokens (mask 0) cost nothing, and the mean is over trained tokens.
/// Returns the loss and the number of trained tokens.
pub fn masked_cross_entropy(
    logits: &Tensor,
    ids: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    let logits = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let targets = ids.narrow(1, 1, t - 1)?.flatten_all()?;
    let weights = mask.narrow(1, 1, t - 1)?.flatten_all()?.to_dtype(logits.dtype())?;
    let n = weights.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
    if n == 0 {
        candle_core::bail!("no trained token in the batch")
    }
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?; // [N, V]
    let nll = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?; // [N]
    let loss = ((nll * weights)?.sum_all()? / n as f64)?;
    Ok((loss, n))
}

pub use crate::ops::cross_entropy;
