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
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return cross_entropy_cpu(logits, targets);
    }
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

/// [`cross_entropy`] on the CPU in f32: one pass over the logits forward (a log-sum-exp per
/// row) and one backward (softmax minus one-hot, written once), where composed ops make half a
/// dozen passes over the step's largest tensor.
fn cross_entropy_cpu(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let logits = logits.contiguous()?;
    let ld = logits.detach();
    let (n, v) = ld.dims2()?;
    let targets: Vec<usize> = targets.to_vec1::<u32>()?.into_iter().map(|t| t as usize).collect();
    if let Some(t) = targets.iter().find(|&&t| t >= v) {
        candle_core::bail!("target token {t} is outside the vocabulary of {v}")
    }
    let (lse, loss) = crate::ops::with_f32(&[&ld], |s| {
        let lse: Vec<f32> = s[0]
            .par_chunks(v)
            .map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln()
            })
            .collect();
        let loss = (0..n).map(|i| (lse[i] - s[0][i * v + targets[i]]) as f64).sum::<f64>();
        Ok((lse, loss / n as f64))
    })?;
    let device = ld.device().clone();
    let loss = Tensor::new(loss as f32, &device)?;
    crate::ops::attach(
        &logits,
        loss,
        "cross-entropy",
        Box::new(move |g, _| {
            let g = g.to_dtype(DType::F32)?.to_scalar::<f32>()? / n as f32;
            let grad = crate::ops::with_f32(&[&ld], |s| {
                let mut grad = vec![0f32; n * v];
                grad.par_chunks_mut(v).zip(s[0].par_chunks(v)).enumerate().for_each(
                    |(i, (out, row))| {
                        for (o, x) in out.iter_mut().zip(row) {
                            *o = (x - lse[i]).exp() * g;
                        }
                        out[targets[i]] -= g;
                    },
                );
                Ok(grad)
            })?;
            Tensor::from_vec(grad, (n, v), &device)
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Both paths: the CPU f32 kernel, and the composed fallback (taken here by f64 logits)
    /// that other devices use.
    #[test]
    fn cross_entropy_and_its_gradient_equal_the_composed_version() {
        for dtype in [DType::F32, DType::F64] {
            let x = Tensor::randn(0f32, 3., (6, 11), &Device::Cpu).unwrap();
            let logits = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
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
            let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            let (a, b) = (scalar(&ours), scalar(&reference));
            assert!((a - b).abs() < 1e-5, "{dtype:?}: {a} vs {b}");
            let g1 = (ours * 3.0).unwrap().backward().unwrap();
            let g2 = (reference * 3.0).unwrap().backward().unwrap();
            let (g1, g2) = (g1.get(&logits).unwrap(), g2.get(&logits).unwrap());
            assert_eq!(g1.dtype(), dtype);
            let diff = (g1 - g2).unwrap().abs().unwrap().max_all().unwrap();
            assert!(scalar(&diff) < 1e-5, "{dtype:?}: {}", scalar(&diff));
        }
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let logits = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        let targets = Tensor::new(&[1u32, 5], &Device::Cpu).unwrap();
        let e = cross_entropy(&logits, &targets).unwrap_err().to_string();
        assert!(e.contains("target token 5 is outside the vocabulary of 5"), "{e}");
    }
}
