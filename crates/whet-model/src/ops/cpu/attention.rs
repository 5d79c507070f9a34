//! Attention on the CPU in f32, forward and backward, one task per (sequence, key/value head)
//! spread over rayon's threads. candle runs the same computation as a dozen tensor ops whose
//! batched matmuls dispatch threads per matrix; here each task runs its small matmuls
//! single-threaded on slices, and the attention weights live only inside the task.
//!
//! Layouts (row-major): queries `[B, K, R*T, D]` (the `R` query heads sharing a key head stacked
//! along time, which is `[B, H, T, D]` unchanged), keys and values `[B, K, S, D]`, an additive
//! mask `[M, T, S]` with `M` 1 or `B`.

use super::gemm::{matmul, matmul_block};
use super::vmath;
use super::{viewed, with_f32};
use candle_core::{DType, Layout, Tensor};
use rayon::prelude::*;

/// Sizes of one call.
#[derive(Debug, Clone, Copy)]
pub(in crate::ops) struct Dims {
    /// Sequences `B`.
    pub b: usize,
    /// Key/value heads `K`.
    pub kv: usize,
    /// Query rows per key/value head, `R*T`.
    pub rt: usize,
    /// New tokens `T`.
    pub t: usize,
    /// Attended tokens `S`.
    pub s: usize,
    /// Head width `D`.
    pub d: usize,
}

/// An additive mask `[M, T, S]`: one for all sequences (`M` = 1) or one per sequence.
#[derive(Debug, Clone, Copy)]
pub(in crate::ops) struct Mask<'a> {
    /// The values, `M * T * S`.
    pub values: &'a [f32],
    /// Whether there is one `[T, S]` mask per sequence.
    pub per_sequence: bool,
}

/// Query rows whose keys are found together: a causal mask needs, for a block of rows, only
/// the keys up to its last row's position, so blocks of this many rows skip about half of the
/// products at training lengths (all of them a row above the diagonal, in the forward pass and
/// the backward's four products). Smaller blocks skip more but multiply less efficiently.
const ROW_BLOCK: usize = 32;

/// A block of query rows `[start, end)` and the key columns `[lo, hi)` it needs.
type Block = (usize, usize, usize, usize);

/// The blocks of query rows `[start, end)` of one task and the key columns `[lo, hi)` each
/// needs: those where some row of the block has a finite mask value (all `S` without a mask,
/// or where every row of the block is masked entirely, which stays NaN as before).
fn row_blocks(mask: Option<&[f32]>, n: Dims) -> Vec<Block> {
    let s = n.s;
    // Per position: the first and one past the last key it attends to.
    let span: Vec<(usize, usize)> = match mask {
        None => vec![(0, s); n.t],
        Some(m) => m
            .chunks_exact(s)
            .map(|row| {
                let first = row.iter().position(|x| *x != f32::NEG_INFINITY).unwrap_or(s);
                let last = row.iter().rposition(|x| *x != f32::NEG_INFINITY).map_or(0, |j| j + 1);
                (first, last)
            })
            .collect(),
    };
    (0..n.rt)
        .step_by(ROW_BLOCK)
        .map(|start| {
            let end = (start + ROW_BLOCK).min(n.rt);
            let (lo, hi) = (start..end)
                .map(|r| span[r % n.t])
                .fold((s, 0), |(lo, hi), (a, b)| (lo.min(a), hi.max(b)));
            if lo < hi {
                (start, end, lo, hi)
            } else {
                (start, end, 0, s)
            }
        })
        .collect()
}

/// The attention weights `softmax(q k^T * scale + mask)` of rows `[start, end)` of one task
/// over key columns `[lo, hi)` into `p` `[end - start, hi - lo]`: the weights of the other
/// columns are exactly 0 (their mask is -inf).
#[allow(clippy::too_many_arguments)]
fn weights(
    p: &mut [f32],
    q: &[f32],
    k: &[f32],
    mask: Option<&[f32]>,
    scale: f32,
    n: Dims,
    (start, end, lo, hi): Block,
) {
    let (s, d, w) = (n.s, n.d, hi - lo);
    let (q, k) = (&q[start * d..end * d], &k[lo * d..hi * d]);
    matmul(p, end - start, w, d, (q, d, 1), (k, 1, d));
    for (i, row) in p.chunks_exact_mut(w).enumerate() {
        let mask = mask.map(|m| &m[((start + i) % n.t) * s + lo..][..w]);
        let mut max = f32::NEG_INFINITY;
        for (j, x) in row.iter_mut().enumerate() {
            *x = *x * scale + mask.map_or(0.0, |m| m[j]);
            max = max.max(*x);
        }
        // Masked entries are -inf, whose exponential is exactly 0.
        let inv = 1.0 / vmath::exp_shifted(row, max);
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

/// The task's slices: its queries (or query gradients), keys, values and mask.
fn task_mask<'a>(mask: Option<Mask<'a>>, task: usize, n: Dims) -> Option<&'a [f32]> {
    mask.map(|m| {
        let b = if m.per_sequence { task / n.kv } else { 0 };
        &m.values[b * n.t * n.s..][..n.t * n.s]
    })
}

/// [`row_blocks`] of each distinct mask of a call, one per sequence or one for all, so that
/// the tasks sharing a mask do not scan it again. Task `b * K + kv` takes entry
/// `min(b, len - 1)` (see [`task_blocks`]).
fn mask_blocks(mask: Option<Mask>, n: Dims) -> Vec<Vec<Block>> {
    let masks = if mask.is_some_and(|m| m.per_sequence) { n.b } else { 1 };
    (0..masks).map(|b| row_blocks(task_mask(mask, b * n.kv, n), n)).collect()
}

/// The blocks of task `task` from [`mask_blocks`].
fn task_blocks(blocks: &[Vec<Block>], task: usize, n: Dims) -> &[Block] {
    &blocks[(task / n.kv).min(blocks.len() - 1)]
}

/// Keys or values `[B, K, S, D]` whose heads lie `head_stride` values apart (at least `S * D`;
/// more when they are a view of a longer cache), each head's `S` rows contiguous.
#[derive(Debug, Clone, Copy)]
pub(in crate::ops) struct Heads<'a> {
    values: &'a [f32],
    head_stride: usize,
}

impl<'a> Heads<'a> {
    fn contiguous(values: &'a [f32], n: Dims) -> Self {
        Heads { values, head_stride: n.s * n.d }
    }

    /// Head `task` (`b * K + kv`): `S * D` values.
    fn head(&self, task: usize, n: Dims) -> &'a [f32] {
        &self.values[task * self.head_stride..][..n.s * n.d]
    }
}

/// Output `[B, K, R*T, D]`.
pub(in crate::ops) fn forward(
    q: &[f32],
    k: Heads,
    v: Heads,
    mask: Option<Mask>,
    scale: f32,
    n: Dims,
) -> Vec<f32> {
    let qn = n.rt * n.d;
    let mut y = vec![0f32; n.b * n.kv * qn];
    let blocks = mask_blocks(mask, n);
    y.par_chunks_mut(qn).enumerate().for_each(|(task, y)| {
        let (q, k, v) = (&q[task * qn..][..qn], k.head(task, n), v.head(task, n));
        let mask = task_mask(mask, task, n);
        let mut p = vec![];
        for &block @ (start, end, lo, hi) in task_blocks(&blocks, task, n) {
            p.resize((end - start) * (hi - lo), 0.0);
            weights(&mut p, q, k, mask, scale, n, block);
            let (y, v) = (&mut y[start * n.d..end * n.d], &v[lo * n.d..hi * n.d]);
            matmul(y, end - start, n.d, hi - lo, (&p, hi - lo, 1), (v, n.d, 1));
        }
    });
    y
}

/// Gradients of `q`, `k`, `v` for the output gradient `dy` (shaped like `q`): with `P` the
/// recomputed weights, `dV = P^T dy`, `dP = dy V^T`, `dS = P * (dP - rowsum(dP * P))`,
/// `dQ = scale * dS K`, `dK = scale * dS^T Q`.
#[allow(clippy::too_many_arguments)]
pub(in crate::ops) fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dy: &[f32],
    mask: Option<Mask>,
    scale: f32,
    n: Dims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (qn, kn) = (n.rt * n.d, n.s * n.d);
    let tasks = n.b * n.kv;
    let (mut dq, mut dk, mut dv) =
        (vec![0f32; tasks * qn], vec![0f32; tasks * kn], vec![0f32; tasks * kn]);
    let blocks = mask_blocks(mask, n);
    dq.par_chunks_mut(qn)
        .zip(dk.par_chunks_mut(kn))
        .zip(dv.par_chunks_mut(kn))
        .enumerate()
        .for_each(|(task, ((dq, dk), dv))| {
            let (q, dy) = (&q[task * qn..][..qn], &dy[task * qn..][..qn]);
            let (k, v) = (&k[task * kn..][..kn], &v[task * kn..][..kn]);
            let d = n.d;
            let mask = task_mask(mask, task, n);
            let (mut p, mut ds) = (vec![], vec![]);
            // Each block's share of dV and dK is added to the rows of the keys it used.
            for &block @ (start, end, lo, hi) in task_blocks(&blocks, task, n) {
                let (m, w) = (end - start, hi - lo);
                p.resize(m * w, 0.0);
                ds.resize(m * w, 0.0);
                weights(&mut p, q, k, mask, scale, n, block);
                let (qb, dyb) = (&q[start * d..end * d], &dy[start * d..end * d]);
                let (kb, vb) = (&k[lo * d..hi * d], &v[lo * d..hi * d]);
                matmul_block(&mut dv[lo * d..hi * d], d, w, d, m, (&p, 1, w), (dyb, d, 1), true);
                matmul(&mut ds, m, w, d, (dyb, d, 1), (vb, 1, d)); // dP
                for (dp, p) in ds.chunks_exact_mut(w).zip(p.chunks_exact(w)) {
                    let dot: f32 = dp.iter().zip(p).map(|(a, b)| a * b).sum();
                    dp.iter_mut().zip(p).for_each(|(x, p)| *x = p * (*x - dot) * scale);
                }
                matmul(&mut dq[start * d..end * d], m, d, w, (&ds, w, 1), (kb, d, 1));
                matmul_block(&mut dk[lo * d..hi * d], d, w, d, m, (&ds, 1, w), (qb, d, 1), true);
            }
        });
    (dq, dk, dv)
}

/// The kernel's sizes for `q` `[B, H, T, D]` and `k` `[B, K, S, D]`.
fn dims(q: &[usize], k: &[usize]) -> candle_core::Result<Dims> {
    let ([b, h, t, d], [_, kv, s, _]) = (q, k) else {
        candle_core::bail!("attention: q {q:?} and k {k:?} must have 4 dimensions")
    };
    Ok(Dims { b: *b, kv: *kv, rt: h / kv * t, t: *t, s: *s, d: *d })
}

/// `mask` as the kernel takes it: f32 `[M, T, S]`, contiguous, and whether it has one `[T, S]`
/// block per sequence.
fn kernel_mask(mask: Option<&Tensor>) -> candle_core::Result<Option<(Tensor, bool)>> {
    let Some(mask) = mask else { return Ok(None) };
    let per_sequence = mask.rank() == 4 && mask.dim(0)? > 1;
    Ok(Some((mask.to_dtype(DType::F32)?.contiguous()?, per_sequence)))
}

/// The head stride of keys or values laid out as [`Heads`] wants (contiguous, or a view of the
/// first `S` positions of a longer `[B, K, max, D]` cache), else `None`.
pub(in crate::ops) fn head_stride(layout: &Layout) -> Option<usize> {
    let (&[b, kv, s, d], &[sb, sk, ss, sd]) = (layout.dims(), layout.stride()) else {
        return None;
    };
    if !(sd == 1 && (ss == d || s == 1)) {
        return None; // a head's rows are not one run of `S * D` values
    }
    // Head `b * K + kv` starts at `b * sb + kv * sk`: one stride for all when `sb = K * sk`.
    let stride = match (b, kv) {
        (1, 1) => s * d,
        (_, 1) => sb,
        (1, _) => sk,
        _ if sb == kv * sk => sk,
        _ => return None,
    };
    (stride >= s * d).then_some(stride)
}

/// `data` under `layout` as [`Heads`]; an error for any other layout (the caller makes such
/// tensors contiguous first).
fn heads<'a>(data: &'a [f32], layout: &Layout, n: Dims) -> candle_core::Result<Heads<'a>> {
    if layout.is_contiguous() {
        return Ok(Heads::contiguous(viewed(data, layout), n));
    }
    let Some(head_stride) = head_stride(layout) else {
        candle_core::bail!("attention kernel: keys/values laid out as {layout:?}")
    };
    let tasks = n.b * n.kv;
    let len = (tasks - 1) * head_stride + n.s * n.d;
    Ok(Heads { values: &data[layout.start_offset()..][..len], head_stride })
}

/// The forward kernel on the storage of `q`, `k`, `v` (what a custom op's `cpu_fwd` gets).
pub(in crate::ops) fn forward_storage(
    (q, ql): (&[f32], &Layout),
    (k, kl): (&[f32], &Layout),
    v: &[f32],
    vl: &Layout,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Vec<f32>> {
    let n = dims(ql.dims(), kl.dims())?;
    let (q, k, v) = (viewed(q, ql), heads(k, kl, n)?, heads(v, vl, n)?);
    let scale = scale as f32;
    match kernel_mask(mask)? {
        None => Ok(forward(q, k, v, None, scale, n)),
        Some((mask, per_sequence)) => with_f32(&[&mask], |m| {
            Ok(forward(q, k, v, Some(Mask { values: m[0], per_sequence }), scale, n))
        }),
    }
}

/// The gradients of `q`, `k` and `v` (see [`crate::ops::attention_backward`]).
pub(in crate::ops) fn backward_tensors(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dy: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let n = dims(q.dims(), k.dims())?;
    let (q, k, v, dy) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, dy.contiguous()?);
    let mask = kernel_mask(mask)?;
    let mut ts = vec![&q, &k, &v, &dy];
    if let Some((m, _)) = &mask {
        ts.push(m);
    }
    let (dq, dk, dv) = with_f32(&ts, |s| {
        let m = mask
            .as_ref()
            .map(|(_, per_sequence)| Mask { values: s[4], per_sequence: *per_sequence });
        Ok(backward(s[0], s[1], s[2], s[3], m, scale as f32, n))
    })?;
    let dev = q.device();
    Ok((
        Tensor::from_vec(dq, q.shape(), dev)?,
        Tensor::from_vec(dk, k.shape(), dev)?,
        Tensor::from_vec(dv, v.shape(), dev)?,
    ))
}
