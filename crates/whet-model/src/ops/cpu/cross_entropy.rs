//! Cross-entropy on the CPU in f32: one pass over the logits forward (a log-sum-exp per row) and
//! one backward (softmax minus one-hot, written once), where composed ops make half a dozen
//! passes over the step's largest tensor.

use super::with_f32;
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Mean cross-entropy of `logits` `[N, V]` against `targets` `[N]`, attached to the graph with
/// its closed-form gradient.
pub(in crate::ops) fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.contiguous()?;
    let ld = logits.detach();
    let (n, v) = ld.dims2()?;
    let targets: Vec<usize> = targets.to_vec1::<u32>()?.into_iter().map(|t| t as usize).collect();
    if let Some(t) = targets.iter().find(|&&t| t >= v) {
        candle_core::bail!("target token {t} is outside the vocabulary of {v}")
    }
    let (lse, loss) = with_f32(&[&ld], |s| {
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
            let grad = with_f32(&[&ld], |s| {
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
