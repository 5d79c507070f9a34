//! Training building blocks, each a forward and its hand-written backward, with one backend
//! dispatch per op: whet's CPU kernels (`cpu/`, f32) or the composed reference path
//! (`composed.rs`) that CUDA, Metal, f64 and `WHET_KERNELS=portable` run.
//!
//! Why they exist: candle 0.11.1's fused `rms_norm`, `softmax_last_dim` and `rope` kernels have
//! no backward pass (gradients silently stop there), and its matmul backward also computes the
//! gradient of frozen weights — most of the backward cost of LoRA training.
//!
//! The model's layers call the `*_backward` functions directly; the ops that also serve as
//! nodes of candle's graph (the final norm, the head, attention, SwiGLU, cross-entropy) keep few
//! saved intermediates and, for frozen matmuls, compute no weight gradient at all.
//!
//! This module imports nothing else from the crate, so it can become a crate of its own when
//! the first CUDA kernel arrives (as candle keeps its kernels apart).

mod composed;
mod cpu;
mod graph;
#[cfg(test)]
mod tests;

pub use graph::attach;
pub(crate) use graph::lock;
use graph::{AttentionNode, FrozenMatmul, Precomputed};

use candle_core::quantized::QTensor;
use candle_core::{DType, Result, Tensor};
use std::sync::Arc;

/// Maps the output gradient (and the op's output) to the input gradient.
pub type GradFn = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Whether whet's CPU kernels may run: not when `WHET_KERNELS=portable`, which forces the
/// composed path other devices take, so that path is exercised on a machine without a GPU.
pub fn kernels_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("WHET_KERNELS").map_or(true, |v| v != "portable"))
}

/// Whether whet's CPU kernels run on `x`'s device and dtype.
fn kernel(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && kernels_enabled()
}

/// `x @ weight^T` for a frozen `weight` `[out, in]`: the backward yields `grad @ weight` for `x`
/// and nothing for the weight, which a frozen weight never needs.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(weight, FrozenMatmul)
}

/// The input gradient of [`frozen_matmul`] for output gradient `grad` `[.., out]`:
/// `grad @ weight`.
pub fn frozen_matmul_backward(grad: &Tensor, weight: &Tensor) -> Result<Tensor> {
    // One 2-D matmul over all tokens (a batched one would broadcast the weight per row).
    let dims = grad.dims();
    let g = grad.contiguous()?.flatten_to(dims.len() - 2)?; // [N, out]
    let (n, k) = weight.dims2()?;
    let out = last_dim(dims, k);
    if !(kernel(&g) && kernel(weight) && weight.is_contiguous()) {
        return g.matmul(weight)?.reshape(out);
    }
    let m = g.dim(0)?;
    let dx = cpu::with_f32(&[&g, weight], |s| {
        Ok(cpu::gemm::matmul_pooled(m, k, n, (s[0], n, 1), (s[1], k, 1)))
    })?;
    Tensor::from_vec(dx, out, g.device())
}

/// `x @ w^T` for a frozen block-quantized `w` `[out, in]` (QLoRA's base, quantized prefill),
/// differentiable in `x` (f32): on the CPU the weight is dequantized a tile at a time into an
/// f32 gemm (`cpu/qgemm.rs`); elsewhere dequantized whole for the product and dropped.
pub fn quantized_matmul(x: &Tensor, w: &Arc<QTensor>) -> Result<Tensor> {
    let xd = x.detach().contiguous()?;
    let (dims, k) = (xd.dims().to_vec(), w.shape().dims2()?.1);
    let y = match cpu::qgemm::QWeight::new(w).filter(|_| kernel(&xd)) {
        Some(qw) => {
            let m = xd.elem_count() / k;
            let y = cpu::with_f32(&[&xd], |s| cpu::qgemm::forward(s[0], m, &qw))?;
            Tensor::from_vec(y, last_dim(&dims, w.shape().dims2()?.0), xd.device())?
        }
        None => composed::quantized_matmul(&xd, w)?,
    };
    let w = w.clone();
    attach(x, y, "quantized-matmul", Box::new(move |g, _| quantized_matmul_backward(g, &w)))
}

/// `x @ w^T` for a few rows of `x` (decoding) and a Q8_0 or Q4_0 `w` `[out, in]`, with whet's
/// integer dot-product kernel where it runs (the CPU with AVX2, f32 `x`); `None` elsewhere,
/// for the caller's block product (candle's `QMatMul`). Not differentiable: inference only.
pub fn quantized_matvec(x: &Tensor, w: &QTensor) -> Result<Option<Tensor>> {
    let usable = kernel(x) && cpu::qgemv::available() && cpu::qgemv::supports(w.dtype());
    let Some(qw) = cpu::qgemm::QWeight::new(w).filter(|_| usable) else { return Ok(None) };
    let (n, k) = w.shape().dims2()?;
    if x.dims().last() != Some(&k) {
        return Ok(None); // the caller's product reports the mismatch
    }
    let x = x.contiguous()?;
    let m = x.elem_count() / k;
    let y = cpu::with_f32(&[&x], |s| cpu::qgemv::matvec(s[0], m, &qw))?;
    Tensor::from_vec(y, last_dim(x.dims(), n), x.device()).map(Some)
}

/// `x @ w^T` for a few rows of `x` (decoding) and a dense `w` `[out, in]`, with whet's AVX2
/// matrix-vector kernel where it runs (the CPU, f32, contiguous `w`); `None` elsewhere, for
/// the caller's matmul. Not differentiable: inference only.
pub fn dense_matvec(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let Some((x, m, n, k)) = dense_operands(x, w)? else { return Ok(None) };
    let y = cpu::with_f32(&[&x, w], |s| Ok(cpu::qgemv::matvec_f32(s[0], m, s[1], k)))?;
    let Some(y) = y else { return Ok(None) };
    Tensor::from_vec(y, last_dim(x.dims(), n), x.device()).map(Some)
}

/// `x @ w^T` for many rows of `x` (prefill, scoring) and a dense `w` `[out, in]`, by blocks of
/// `w`'s rows on the pool's threads (`cpu::gemm::matmul_wt`) where whet's kernels run (the
/// CPU, f32, contiguous `w`); `None` elsewhere, for the caller's matmul. Not differentiable.
pub fn dense_matmul(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let Some((x, m, n, k)) = dense_operands(x, w)? else { return Ok(None) };
    let y = cpu::with_f32(&[&x, w], |s| Ok(cpu::gemm::matmul_wt(s[0], m, s[1], n, k)))?;
    Tensor::from_vec(y, last_dim(x.dims(), n), x.device()).map(Some)
}

/// For whet's dense inference products: `x` contiguous and its rows `m`, and `w`'s `[n, k]`,
/// where the kernels run (the CPU, f32, contiguous `w`, `x`'s last dimension `k`); `None`
/// otherwise, for the caller's matmul, which also reports a mismatch.
fn dense_operands(x: &Tensor, w: &Tensor) -> Result<Option<(Tensor, usize, usize, usize)>> {
    if !(kernel(x) && kernel(w) && w.is_contiguous()) {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    if x.dims().last() != Some(&k) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let m = x.elem_count() / k;
    Ok(Some((x, m, n, k)))
}

/// `dims` with the last one set to `n`: a product's output shape.
fn last_dim(dims: &[usize], n: usize) -> Vec<usize> {
    let mut out = dims.to_vec();
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    out
}

/// Rows `ids` (integer ids, any shape) of a quantized `[V, C]` table: `[.., C]` in f32, only
/// the rows read dequantized. Frozen: the table gets no gradient.
pub fn quantized_embedding(ids: &Tensor, table: &QTensor) -> Result<Tensor> {
    let c = table.shape().dims2()?.1;
    let mut dims = ids.dims().to_vec();
    dims.push(c);
    let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
    match cpu::qgemm::QWeight::new(table).filter(|_| ids.device().is_cpu() && kernels_enabled()) {
        Some(qw) => {
            let rows = cpu::qgemm::gather_rows(&qw, &flat.to_vec1::<u32>()?)?;
            Tensor::from_vec(rows, dims, ids.device())
        }
        None => composed::quantized_embedding(&flat, table)?.reshape(dims),
    }
}

/// The input gradient of [`quantized_matmul`] for output gradient `g` `[.., out]`: `g @ w`.
pub fn quantized_matmul_backward(g: &Tensor, w: &QTensor) -> Result<Tensor> {
    let g = g.contiguous()?;
    let (n, k) = w.shape().dims2()?;
    match cpu::qgemm::QWeight::new(w).filter(|_| kernel(&g)) {
        Some(qw) => {
            let m = g.elem_count() / n;
            let dx = cpu::with_f32(&[&g], |s| cpu::qgemm::backward(s[0], m, &qw))?;
            Tensor::from_vec(dx, last_dim(g.dims(), k), g.device())
        }
        None => composed::quantized_matmul_backward(&g, w),
    }
}

/// RMSNorm `x * r * weight` with `r = 1/sqrt(mean(x^2) + eps)` over the last dimension `C`,
/// differentiable in `x` (the weight is frozen).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if kernel(x) && weight.dtype() == DType::F32 {
        return x
            .contiguous()?
            .apply_op2(&weight.contiguous()?, cpu::norm::RmsNormCpu { eps: eps as f32 });
    }
    let xd = x.detach().contiguous()?;
    let y = composed::rms_norm(&xd, weight, eps)?;
    let w = weight.clone();
    attach(x, y, "rms-norm", Box::new(move |g, _| rms_norm_backward(&xd, &w, eps, g)))
}

/// The input gradient of [`rms_norm`] for output gradient `g`:
/// `r * (g*w) - x * r^3 / C * sum(g*w*x)` over the last dimension (the weight is frozen).
pub fn rms_norm_backward(x: &Tensor, weight: &Tensor, eps: f64, g: &Tensor) -> Result<Tensor> {
    if kernel(x) && weight.dtype() == DType::F32 {
        return cpu::norm::backward(x, weight, eps, g);
    }
    composed::rms_norm_backward(x, weight, eps, g)
}

/// Rotary embedding (Hugging Face "half" layout) of contiguous `x` `[B, heads, T, D]` with
/// `cos`/`sin` `[T, D/2]` or `[B, T, D/2]`: candle's fused kernel, or the same rotation composed
/// where it has none (f64) or under `WHET_KERNELS=portable`. Not differentiable; see
/// [`rope_backward`].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if kernels_enabled() {
        if let Ok(y) = candle_nn::rotary_emb::rope(x, cos, sin) {
            return Ok(y);
        }
    }
    composed::rope(x, cos, sin)
}

/// The input gradient of [`rope`] for output gradient `g`: a rotation's gradient is the
/// inverse rotation, RoPE with `-sin`.
pub fn rope_backward(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope(&g.contiguous()?, cos, &sin.neg()?)
}

/// SwiGLU's gate, `silu(gate) * up` (Shazeer, "GLU Variants Improve Transformer", 2020). On the
/// CPU in f32 one pass each way (the composed form makes about fifteen passes over these, the
/// widest activations of a block, in the backward pass); elsewhere candle's ops.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !(kernel(gate) && up.dtype() == DType::F32) {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, cpu::swiglu::SwiGlu)
}

/// The gradients of [`swiglu`]'s `gate` and `up` for output gradient `dy`.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    if !(kernel(gate) && up.dtype() == DType::F32) {
        return composed::swiglu_backward(gate, up, dy);
    }
    cpu::swiglu::backward(gate, up, dy)
}

/// Scaled dot-product attention of `q` `[B, H, T, D]` over `k`, `v` `[B, K, S, D]`, each
/// key/value head shared by `R = H/K` query heads, with an additive `mask` `[T, S]` or
/// `[B, 1, T, S]`; scores and softmax in f32 (f16/bf16 exponentials overflow). Output
/// `[B, H, T, D]`.
///
/// The `R` query heads of a group are stacked along time (`[B, K, R*T, D]`), so keys and values
/// are never copied per query head. The backward recomputes the attention weights from `q` and
/// `k` instead of keeping the `[B, H, T, S]` scores and softmax for the whole forward pass: they
/// are a block's largest activations at training lengths (the trade FlashAttention makes).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let q = q.contiguous()?;
    if !kernel(&q) {
        // No kernel of whet's own here: the composed ops, outside the graph.
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let out = composed::attention(&q, &k, &v, mask, scale)?;
        if !(q.track_op() || k.track_op() || v.track_op()) {
            return Ok(out);
        }
        let op = AttentionNode { y: Precomputed::new(Some(out)), mask: mask.cloned(), scale };
        return q.apply_op3(&k, &v, op);
    }
    // Decoding passes views of the first positions of its key/value cache: the kernel reads
    // them in place instead of copying the whole cache in every layer for every token.
    let heads = |t: &Tensor| match cpu::attention::head_stride(t.layout()) {
        Some(_) => Ok(t.clone()),
        None => t.contiguous(),
    };
    let op = AttentionNode { y: Precomputed::new(None), mask: mask.cloned(), scale };
    q.apply_op3(&heads(k)?, &heads(v)?, op)
}

/// The gradients of [`attention`]'s `q`, `k` and `v` for output gradient `dy`, with `P` the
/// recomputed weights and `S` the scores: `dV = P^T dy`, `dP = dy V^T`,
/// `dS = P * (dP - rowsum(dP * P))`, `dQ = scale * dS K`, `dK = scale * dS^T Q`.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dy: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    if kernel(q) {
        return cpu::attention::backward_tensors(q, k, v, dy, mask, scale);
    }
    composed::attention_backward(q, k, v, dy, mask, scale)
}

/// Mean cross-entropy of `logits` `[N, V]` against `targets` `[N]` (u32). Computed outside the
/// graph and attached with its closed-form gradient `(softmax(logits) - onehot) / N`, so the
/// log-softmax intermediates — each as large as the logits, the biggest tensors of a step — are
/// not kept for the backward pass.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if kernel(logits) {
        return cpu::cross_entropy::cross_entropy(logits, targets);
    }
    composed::cross_entropy(logits, targets)
}

/// Mean cross-entropy of the logits `h @ w^T` `[N, V]` (a frozen head `w` `[V, C]`) against
/// `targets` `[N]`, differentiable in `h`. On the CPU in f32 the logits are formed a block of
/// rows at a time and each block's gradient is multiplied back through the head at once, so
/// the `[N, V]` logits and their gradient, the largest tensors of a training step (2 x 100 MB
/// for 512 tokens of a 49k vocabulary), never exist whole; the gradient of `h` is computed
/// with the loss (only where `h` is part of a graph) and scaled by the output gradient in the
/// backward pass. `None` elsewhere, for the caller's head product and [`cross_entropy`].
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Option<Tensor>> {
    if !(kernel(h) && kernel(w) && w.is_contiguous() && h.rank() == 2) {
        return Ok(None);
    }
    let head = cpu::cross_entropy::Head::Dense(w);
    cpu::cross_entropy::linear_cross_entropy(h, head, targets).map(Some)
}

/// [`linear_cross_entropy`] for a block-quantized head (QLoRA's tied embedding), its blocks
/// dequantized a tile at a time as in [`quantized_matmul`].
pub fn quantized_linear_cross_entropy(
    h: &Tensor,
    w: &QTensor,
    targets: &Tensor,
) -> Result<Option<Tensor>> {
    let Some(qw) = cpu::qgemm::QWeight::new(w).filter(|_| kernel(h) && h.rank() == 2) else {
        return Ok(None);
    };
    cpu::cross_entropy::linear_cross_entropy(h, cpu::cross_entropy::Head::Quantized(qw), targets)
        .map(Some)
}
