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

/// Mean cross-entropy of `logits` `[N, V]` against `targets` `[N]` (u32). Computed outside the
/// graph and attached with its closed-form gradient `(softmax(logits) - onehot) / N`, so the
/// log-softmax intermediates — each as large as the logits, the biggest tensors of a step — are
/// not kept for the backward pass.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let ld = logits.detach().to_dtype(DType::F32)?;
    let max = ld.max_keepdim(D::Minus1)?;
    let lse = (ld.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?; // [N, 1]
    let picked = ld.gather(&targets.unsqueeze(1)?, 1)?; // [N, 1]
    let loss = (lse - picked)?.mean_all()?;
    let (targets, dtype) = (targets.clone(), logits.dtype());
    crate::ops::attach(
        logits,
        loss,
        "cross-entropy",
        Box::new(move |g, _| {
            let p = candle_nn::ops::softmax_last_dim(&ld)?;
            let ones = Tensor::ones((n, 1), DType::F32, ld.device())?;
            let onehot = p.zeros_like()?.scatter_add(&targets.unsqueeze(1)?, &ones, 1)?;
            ((p - onehot)? / n as f64)?.broadcast_mul(&g.to_dtype(DType::F32)?)?.to_dtype(dtype)
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn cross_entropy_and_its_gradient_equal_the_composed_version() {
        let logits = Var::randn(0f32, 3., (6, 11), &Device::Cpu).unwrap();
        let targets = Tensor::new(&[0u32, 10, 3, 3, 7, 1], &Device::Cpu).unwrap();
        let ours = cross_entropy(logits.as_tensor(), &targets).unwrap();
        let logp = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1).unwrap();
        let reference = logp
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .neg()
            .unwrap()
            .mean_all()
            .unwrap();
        let (a, b) = (ours.to_scalar::<f32>().unwrap(), reference.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let g1 = (ours * 3.0).unwrap().backward().unwrap();
        let g2 = (reference * 3.0).unwrap().backward().unwrap();
        let diff = (g1.get(&logits).unwrap() - g2.get(&logits).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
