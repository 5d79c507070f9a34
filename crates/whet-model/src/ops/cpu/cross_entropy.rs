//! Cross-entropy on the CPU in f32: one pass over the logits forward (a log-sum-exp per row) and
//! one backward (softmax minus one-hot, written once), where composed ops make half a dozen
//! passes over the step's largest tensor; and the same fused with the head's product, a block
//! of rows at a time, so that the logits never exist whole.

use super::qgemm::{self, QWeight};
use super::{gemm, vmath, with_f32};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Logits formed at a time by [`linear_cross_entropy`]: whole rows, at most this many values
/// (64 MB). A training shard of 2 x 128 tokens of a 49k vocabulary is one block; longer ones
/// take several, each re-reading the head for its two products. Measured with `whet bench
/// train` (SmolLM2-135M shapes, 4 x 128, two shards), alternated 5 times against 32 MB blocks
/// (two per shard): 196 vs 179 tokens/s median, peak RSS 1153-1223 vs 1077-1085 MB (the
/// unfused head and loss: 1456 MB).
const BLOCK_VALUES: usize = 1 << 24;

/// Mean cross-entropy of `logits` `[N, V]` against `targets` `[N]`, attached to the graph with
/// its closed-form gradient.
pub(in crate::ops) fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.contiguous()?;
    let ld = logits.detach();
    let (n, v) = ld.dims2()?;
    let targets = checked_targets(targets, n, v)?;
    let (lse, loss) = with_f32(&[&ld], |s| {
        let lse = log_sum_exp(s[0], v);
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
                let mut grad = s[0].to_vec();
                grad.par_chunks_mut(v).enumerate().for_each(|(i, out)| {
                    vmath::exp_shifted(out, lse[i]);
                    out.iter_mut().for_each(|o| *o *= g);
                    out[targets[i]] -= g;
                });
                Ok(grad)
            })?;
            Tensor::from_vec(grad, (n, v), &device)
        }),
    )
}

/// `targets` `[n]` as indices, each checked against the vocabulary size `v`.
fn checked_targets(targets: &Tensor, n: usize, v: usize) -> Result<Vec<usize>> {
    let targets: Vec<usize> = targets.to_vec1::<u32>()?.into_iter().map(|t| t as usize).collect();
    if targets.len() != n {
        candle_core::bail!("{} targets for {n} rows of logits", targets.len())
    }
    if let Some(t) = targets.iter().find(|&&t| t >= v) {
        candle_core::bail!("target token {t} is outside the vocabulary of {v}")
    }
    Ok(targets)
}

/// The log-sum-exp of each row of `logits` (rows of `v`).
fn log_sum_exp(logits: &[f32], v: usize) -> Vec<f32> {
    logits
        .par_chunks(v)
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            max + vmath::sum_exp_shifted(row, max).ln()
        })
        .collect()
}

/// A head `[V, C]` for [`linear_cross_entropy`]: dense f32, or block-quantized (QLoRA).
pub(in crate::ops) enum Head<'a> {
    Dense(&'a Tensor),
    Quantized(QWeight<'a>),
}

impl Head<'_> {
    fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Head::Dense(w) => w.dims2(),
            Head::Quantized(w) => Ok((w.rows(), w.cols())),
        }
    }
}

/// Mean cross-entropy of `h @ w^T` (`h` `[N, C]`, `w` `[V, C]`) against `targets` `[N]`, a
/// block of rows of logits at a time (see [`BLOCK_VALUES`]). Where `h` is part of a graph, each
/// block's gradient `(softmax - onehot) / N` is written over its logits and multiplied through
/// the head into `dh` `[N, C]` straight away; the backward pass only scales `dh`.
pub(in crate::ops) fn linear_cross_entropy(
    h: &Tensor,
    w: Head,
    targets: &Tensor,
) -> Result<Tensor> {
    linear_cross_entropy_in_blocks(h, w, targets, BLOCK_VALUES)
}

/// [`linear_cross_entropy`] with blocks of at most `block_values` logits (at least one row).
pub(in crate::ops) fn linear_cross_entropy_in_blocks(
    h: &Tensor,
    w: Head,
    targets: &Tensor,
    block_values: usize,
) -> Result<Tensor> {
    let hd = h.detach().contiguous()?;
    let (n, c) = hd.dims2()?;
    let (v, wc) = w.dims()?;
    if wc != c {
        candle_core::bail!("head of width {wc} for hidden states of width {c}")
    }
    let targets = checked_targets(targets, n, v)?;
    let want_grad = h.track_op();
    let (loss, dh) = match &w {
        Head::Dense(w) => with_f32(&[&hd, w], |s| {
            let ws = s[1];
            blocks(
                s[0],
                n,
                c,
                v,
                &targets,
                want_grad,
                block_values,
                |hb, r| Ok(gemm::matmul_pooled(r, v, c, (hb, c, 1), (ws, 1, c))),
                |gb, r| Ok(gemm::matmul_pooled(r, c, v, (gb, v, 1), (ws, c, 1))),
            )
        })?,
        Head::Quantized(w) => with_f32(&[&hd], |s| {
            blocks(
                s[0],
                n,
                c,
                v,
                &targets,
                want_grad,
                block_values,
                |hb, r| qgemm::forward(hb, r, w),
                |gb, r| qgemm::backward(gb, r, w),
            )
        })?,
    };
    let device = hd.device().clone();
    let loss = Tensor::new(loss as f32, &device)?;
    if !want_grad {
        return Ok(loss);
    }
    let dh = Tensor::from_vec(dh, (n, c), &device)?;
    crate::ops::attach(
        h,
        loss,
        "linear-cross-entropy",
        Box::new(move |g, _| dh.affine(g.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64, 0.0)),
    )
}

/// The loop of [`linear_cross_entropy_in_blocks`] over blocks of rows of `h` `[n, c]`: the mean
/// loss and, with `want_grad`, `dh`. `logits(hb, r)` is a block's `[r, v]` logits,
/// `through(gb, r)` a block's gradient `[r, v]` times the head, `[r, c]`.
#[allow(clippy::too_many_arguments)]
fn blocks(
    h: &[f32],
    n: usize,
    c: usize,
    v: usize,
    targets: &[usize],
    want_grad: bool,
    block_values: usize,
    logits: impl Fn(&[f32], usize) -> Result<Vec<f32>>,
    through: impl Fn(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<(f64, Vec<f32>)> {
    let blocks = n.div_ceil((block_values / v).max(1)).max(1);
    let rows = n.div_ceil(blocks).max(1);
    let (mut loss, mut dh) = (0f64, Vec::with_capacity(if want_grad { n * c } else { 0 }));
    for start in (0..n).step_by(rows) {
        let r = rows.min(n - start);
        let mut z = logits(&h[start * c..(start + r) * c], r)?; // [r, V]
        let lse = log_sum_exp(&z, v);
        loss += (0..r).map(|i| (lse[i] - z[i * v + targets[start + i]]) as f64).sum::<f64>();
        if want_grad {
            let inv_n = 1.0 / n as f32;
            z.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
                vmath::exp_shifted(row, lse[i]);
                row.iter_mut().for_each(|x| *x *= inv_n);
                row[targets[start + i]] -= inv_n;
            });
            dh.extend(through(&z, r)?);
        }
    }
    Ok((loss / n as f64, dh))
}
