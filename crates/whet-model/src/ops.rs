//! Training building blocks, each a forward and its hand-written backward. candle 0.11.1's
//! fused `rms_norm`, `softmax_last_dim` and `rope` kernels have no backward pass (gradients
//! silently stop there), and its matmul backward also computes the gradient of frozen weights —
//! most of the backward cost of LoRA training.
//!
//! The model's blocks call the `*_backward` functions directly (see `Block::backward`); the ops
//! that also serve as nodes of candle's graph (the final norm, the head, attention, SwiGLU)
//! keep few saved intermediates and, for frozen matmuls, compute no weight gradient at all. On
//! the CPU in f32, RMSNorm, SwiGLU and attention run whet's own kernels; elsewhere candle's ops.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, MetalStorage, Result,
    Shape, Storage, Tensor, D,
};
use std::sync::Mutex;

/// Maps the output gradient (and the op's output) to the input gradient.
type GradFn = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// `y`, computed outside the graph from `x`, made a function of `x` whose backward maps the
/// output gradient (and the output) to `x`'s gradient with `grad`.
pub fn attach(x: &Tensor, y: Tensor, name: &'static str, grad: GradFn) -> Result<Tensor> {
    let y = y.contiguous()?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(Attach { name, y: Precomputed::new(y), grad })
}

/// `m`, locked; a poisoned lock (a panic while it was held) is an error.
pub(crate) fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))
}

/// The values of contiguous CPU storage `data` that `layout` covers.
fn viewed<'a>(data: &'a [f32], layout: &Layout) -> &'a [f32] {
    &data[layout.start_offset()..][..layout.shape().elem_count()]
}

/// A result computed before its op runs. The op's forward copies it and drops it, so the graph
/// keeps only the copy (custom ops must return fresh storage).
struct Precomputed(Mutex<Option<Tensor>>);

impl Precomputed {
    fn new(y: Tensor) -> Self {
        Self(Mutex::new(Some(y)))
    }

    /// Whether a result is waiting.
    fn is_set(&self) -> bool {
        self.0.lock().is_ok_and(|y| y.is_some())
    }

    fn take(&self) -> Result<Tensor> {
        let y = lock(&self.0)?.take();
        y.ok_or_else(|| candle_core::Error::Msg("precomputed result used twice".into()))
    }

    /// The storage of the result as backend `S`, copied.
    fn copy<S: BackendStorage>(&self, pick: fn(&Storage) -> Option<&S>) -> Result<(S, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        let Some(s) = pick(&storage) else {
            candle_core::bail!("precomputed result on another device")
        };
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("precomputed result must be contiguous")
        }
        Ok((s.try_clone(layout)?, layout.shape().clone()))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        self.copy(|s| if let Storage::Cpu(s) = s { Some(s) } else { None })
    }

    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        self.copy(|s| if let Storage::Cuda(s) = s { Some(s) } else { None })
    }

    fn metal(&self) -> Result<(MetalStorage, Shape)> {
        self.copy(|s| if let Storage::Metal(s) = s { Some(s) } else { None })
    }
}

/// Forward: the precomputed result. Backward: `grad`.
struct Attach {
    name: &'static str,
    y: Precomputed,
    grad: GradFn,
}

impl CustomOp1 for Attach {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.y.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.y.cuda()
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.y.metal()
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.grad)(grad, res)?))
    }
}

/// `x @ weight^T` for a frozen `weight` `[out, in]`: the backward yields `grad @ weight` for `x`
/// and nothing for the weight, which a frozen weight never needs.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(weight, FrozenMatmul)
}

/// `x [.., in] @ w^T`, `w` `[out, in]`, run by the backend's matmul straight into the output.
struct FrozenMatmul;

impl FrozenMatmul {
    fn fwd<S: BackendStorage>(x: &S, xl: &Layout, w: &S, wl: &Layout) -> Result<(S, Shape)> {
        let (n, k) = wl.shape().dims2()?;
        let dims = xl.dims();
        if !xl.is_contiguous() || dims.last() != Some(&k) {
            candle_core::bail!(
                "frozen matmul: input {:?} against weight {:?}",
                xl.shape(),
                wl.shape()
            )
        }
        let m = xl.shape().elem_count() / k;
        let lhs = Layout::contiguous_with_offset((m, k), xl.start_offset());
        let y = x.matmul(w, (1, m, n, k), &lhs, &wl.transpose(0, 1)?)?;
        let mut out = dims.to_vec();
        out[dims.len() - 1] = n;
        Ok((y, Shape::from(out)))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (x, w) else {
            return Self::fwd(x, xl, w, wl);
        };
        // f32: gemm on the current pool's threads (candle's matmul always uses all of them).
        let (n, k) = wl.shape().dims2()?;
        let dims = xl.dims();
        if !xl.is_contiguous() || !wl.is_contiguous() || dims.last() != Some(&k) {
            return Self::fwd(x, xl, w, wl);
        }
        let m = xl.shape().elem_count() / k;
        let (xs, ws) = (viewed(xs, xl), viewed(ws, wl));
        let y = crate::cpu_matmul::matmul_pooled(m, n, k, (xs, k, 1), (ws, 1, k));
        let mut out = dims.to_vec();
        out[dims.len() - 1] = n;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Self::fwd(x, xl, w, wl)
    }

    fn metal_fwd(
        &self,
        x: &MetalStorage,
        xl: &Layout,
        w: &MetalStorage,
        wl: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        Self::fwd(x, xl, w, wl)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(frozen_matmul_backward(grad, w)?), None))
    }
}

/// The input gradient of [`frozen_matmul`] for output gradient `grad` `[.., out]`:
/// `grad @ weight`.
pub fn frozen_matmul_backward(grad: &Tensor, weight: &Tensor) -> Result<Tensor> {
    // One 2-D matmul over all tokens (a batched one would broadcast the weight per row).
    let dims = grad.dims();
    let g = grad.contiguous()?.flatten_to(dims.len() - 2)?; // [N, out]
    let mut out = dims.to_vec();
    let (n, k) = weight.dims2()?;
    out[dims.len() - 1] = k;
    if !(cpu_f32(&g) && cpu_f32(weight) && weight.is_contiguous()) {
        return g.matmul(weight)?.reshape(out);
    }
    let m = g.dim(0)?;
    let dx = with_f32(&[&g, weight], |s| {
        Ok(crate::cpu_matmul::matmul_pooled(m, k, n, (s[0], n, 1), (s[1], k, 1)))
    })?;
    Tensor::from_vec(dx, out, g.device())
}

/// RMSNorm `x * r * weight` with `r = 1/sqrt(mean(x^2) + eps)` over the last dimension `C`;
/// gradient `r * (g*w) - x * r^3 / C * sum(g*w*x)` (the weight is frozen).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu_f32(x) && weight.dtype() == DType::F32 {
        return x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNormCpu { eps: eps as f32 });
    }
    let xd = x.detach().contiguous()?;
    let y = match candle_nn::ops::rms_norm(&xd, weight, eps as f32) {
        Ok(y) => y,
        // No fused kernel for this dtype/backend (f64 in gradient checks): compose it.
        Err(_) => xd
            .broadcast_div(&(xd.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?)?
            .broadcast_mul(weight)?,
    };
    let w = weight.clone();
    attach(x, y, "rms-norm", Box::new(move |g, _| rms_norm_backward(&xd, &w, eps, g)))
}

/// The input gradient of [`rms_norm`] for output gradient `g`:
/// `r * (g*w) - x * r^3 / C * sum(g*w*x)` over the last dimension (the weight is frozen).
pub fn rms_norm_backward(x: &Tensor, weight: &Tensor, eps: f64, g: &Tensor) -> Result<Tensor> {
    if cpu_f32(x) && weight.dtype() == DType::F32 {
        let (x, g) = (x.contiguous()?, g.contiguous()?);
        let c = weight.elem_count();
        let eps = eps as f32;
        let dx = with_f32(&[&x, &weight.contiguous()?, &g], |s| {
            use rayon::prelude::*;
            let (x, w, g) = (s[0], s[1], s[2]);
            let mut dx = vec![0f32; x.len()];
            dx.par_chunks_mut(c).zip(x.par_chunks(c).zip(g.par_chunks(c))).for_each(
                |(dx, (x, g))| {
                    let r = rms_recip(x, eps);
                    let dot: f32 = x.iter().zip(g).zip(w).map(|((x, g), w)| g * w * x).sum();
                    let coef = r * r * r / c as f32 * dot;
                    for i in 0..c {
                        dx[i] = r * g[i] * w[i] - x[i] * coef;
                    }
                },
            );
            Ok(dx)
        })?;
        return Tensor::from_vec(dx, x.shape(), x.device());
    }
    let c = x.dim(D::Minus1)? as f64;
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?; // [.., 1]
    let gw = g.broadcast_mul(weight)?;
    let dot = (&gw * x)?.sum_keepdim(D::Minus1)?; // [.., 1]
    let coef = ((r.powf(3.0)? * dot)? / c)?;
    gw.broadcast_mul(&r)? - x.broadcast_mul(&coef)?
}

/// `1 / sqrt(mean(x^2) + eps)` of one row.
fn rms_recip(x: &[f32], eps: f32) -> f32 {
    1.0 / (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + eps).sqrt()
}

/// The CPU f32 kernel of [`rms_norm`], one pass over the rows each way.
struct RmsNormCpu {
    eps: f32,
}

impl CustomOp2 for RmsNormCpu {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (x, w) else {
            candle_core::bail!("rms-norm kernel: f32 only")
        };
        let c = wl.shape().elem_count();
        if xl.dims().last() != Some(&c) || !xl.is_contiguous() || !wl.is_contiguous() {
            candle_core::bail!("rms-norm: input {:?} against weight {:?}", xl.shape(), wl.shape())
        }
        let (x, w) = (viewed(x, xl), viewed(w, wl));
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(y, x)| {
            let r = rms_recip(x, self.eps);
            y.iter_mut().zip(x).zip(w).for_each(|((y, x), w)| *y = x * r * w);
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(rms_norm_backward(x, w, self.eps as f64, g)?), None))
    }
}

/// The input gradient of [`rope`] for output gradient `g`: a rotation's gradient is the
/// inverse rotation, RoPE with `-sin`.
pub fn rope_backward(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope(&g.contiguous()?, cos, &sin.neg()?)
}

/// Rotary embedding (Hugging Face "half" layout) of contiguous `x` `[B, heads, T, D]` with
/// `cos`/`sin` `[T, D/2]` or `[B, T, D/2]`: candle's fused kernel, or the same rotation composed
/// where it has none (f64). Not differentiable; see [`rope_backward`].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if let Ok(y) = candle_nn::rotary_emb::rope(x, cos, sin) {
        return Ok(y);
    }
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    // Broadcast over heads: [T, D] -> [1, 1, T, D]; [B, T, D] -> [B, 1, T, D].
    let (cos, sin) = if cos.rank() == 2 {
        (cos.unsqueeze(0)?.unsqueeze(0)?, sin.unsqueeze(0)?.unsqueeze(0)?)
    } else {
        (cos.unsqueeze(1)?, sin.unsqueeze(1)?)
    };
    let half = x.dim(D::Minus1)? / 2;
    let rotated = Tensor::cat(
        &[&x.narrow(D::Minus1, half, half)?.neg()?, &x.narrow(D::Minus1, 0, half)?],
        D::Minus1,
    )?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// SwiGLU's gate, `silu(gate) * up` (Shazeer, "GLU Variants Improve Transformer", 2020). On the
/// CPU in f32 one pass each way (the composed form makes about fifteen passes over these, the
/// widest activations of a block, in the backward pass); elsewhere candle's ops.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !(cpu_f32(gate) && up.dtype() == DType::F32) {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// The CPU f32 kernel of [`swiglu`]. With `s = sigmoid(g)`: `y = g s u`,
/// `dg = dy u s (1 + g (1 - s))`, `du = dy g s`.
struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (CpuStorage::F32(g), CpuStorage::F32(u)) = (g, u) else {
            candle_core::bail!("swiglu kernel: f32 only")
        };
        if gl.shape() != ul.shape() || !gl.is_contiguous() || !ul.is_contiguous() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", gl.shape(), ul.shape())
        }
        let n = gl.shape().elem_count();
        let (g, u) = (viewed(g, gl), viewed(u, ul));
        let mut y = vec![0f32; n];
        y.par_chunks_mut(4096).zip(g.par_chunks(4096)).zip(u.par_chunks(4096)).for_each(
            |((y, g), u)| {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y = g / (1.0 + (-g).exp()) * u;
                }
            },
        );
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = swiglu_backward(g, u, dy)?;
        Ok((Some(dg), Some(du)))
    }
}

/// The gradients of [`swiglu`]'s `gate` and `up` for output gradient `dy`.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    if !(cpu_f32(gate) && up.dtype() == DType::F32) {
        let sig = candle_nn::ops::sigmoid(gate)?;
        let gs = (gate * &sig)?;
        let du = (dy * &gs)?;
        let dg = ((dy * up)? * ((&sig + &gs)? - (&gs * &sig)?)?)?;
        return Ok((dg, du));
    }
    use rayon::prelude::*;
    let (g, u, dy) = (gate.contiguous()?, up.contiguous()?, dy.contiguous()?);
    let (dg, du) = with_f32(&[&g, &u, &dy], |s| {
        let n = s[0].len();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        dg.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .zip(s[0].par_chunks(4096).zip(s[1].par_chunks(4096)).zip(s[2].par_chunks(4096)))
            .for_each(|((dg, du), ((g, u), dy))| {
                for i in 0..g.len() {
                    let sig = 1.0 / (1.0 + (-g[i]).exp());
                    du[i] = dy[i] * g[i] * sig;
                    dg[i] = dy[i] * u[i] * sig * (1.0 + g[i] * (1.0 - sig));
                }
            });
        Ok((dg, du))
    })?;
    let dev = gate.device();
    Ok((Tensor::from_vec(dg, gate.shape(), dev)?, Tensor::from_vec(du, up.shape(), dev)?))
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
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mut y = None;
    if !cpu_f32(&q) {
        // No kernel of whet's own here: candle's ops, outside the graph.
        let (b, h, t, d) = q.dims4()?;
        let qg = q.detach().reshape((b, k.dim(1)?, h / k.dim(1)? * t, d))?;
        let p = attention_weights(&qg, &k.detach(), mask, scale, t)?; // [B, K, R*T, S]
        let out = p.to_dtype(v.dtype())?.matmul(&v.detach())?.reshape((b, h, t, d))?;
        if !(q.track_op() || k.track_op() || v.track_op()) {
            return Ok(out);
        }
        y = Some(out);
    }
    let op = Attention { y: Precomputed(Mutex::new(y)), mask: mask.cloned(), scale };
    q.apply_op3(&k, &v, op)
}

/// Whether whet's CPU attention kernel runs on `x`'s device and dtype.
fn cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// The f32 slices of contiguous CPU tensors, for `f`.
pub(crate) fn with_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = vec![];
    for (storage, layout) in &guards {
        let Storage::Cpu(CpuStorage::F32(v)) = &**storage else {
            candle_core::bail!("expected f32 tensors on the CPU")
        };
        if !layout.is_contiguous() {
            candle_core::bail!("expected contiguous tensors")
        }
        slices.push(viewed(v, layout));
    }
    f(&slices)
}

impl Attention {
    /// The kernel's sizes for `q` `[B, H, T, D]` and `k` `[B, K, S, D]`.
    fn dims(q: &[usize], k: &[usize]) -> Result<crate::attention_cpu::Dims> {
        let ([b, h, t, d], [_, kv, s, _]) = (q, k) else {
            candle_core::bail!("attention: q {q:?} and k {k:?} must have 4 dimensions")
        };
        Ok(crate::attention_cpu::Dims { b: *b, kv: *kv, rt: h / kv * t, t: *t, s: *s, d: *d })
    }

    fn cpu_forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: crate::attention_cpu::Dims,
    ) -> Result<Vec<f32>> {
        let scale = self.scale as f32;
        match kernel_mask(self.mask.as_ref())? {
            None => Ok(crate::attention_cpu::forward(q, k, v, None, scale, n)),
            Some((mask, per_sequence)) => with_f32(&[&mask], |m| {
                let mask = crate::attention_cpu::Mask { values: m[0], per_sequence };
                Ok(crate::attention_cpu::forward(q, k, v, Some(mask), scale, n))
            }),
        }
    }
}

/// `mask` as the CPU kernel takes it: f32 `[M, T, S]`, contiguous, and whether it has one
/// `[T, S]` block per sequence.
fn kernel_mask(mask: Option<&Tensor>) -> Result<Option<(Tensor, bool)>> {
    let Some(mask) = mask else { return Ok(None) };
    let per_sequence = mask.rank() == 4 && mask.dim(0)? > 1;
    Ok(Some((mask.to_dtype(DType::F32)?.contiguous()?, per_sequence)))
}

/// `softmax(q k^T * scale + mask)` for grouped queries `qg` `[B, K, R*T, D]`: `[B, K, R*T, S]`,
/// in f32 (f64 stays f64).
fn attention_weights(
    qg: &Tensor,
    k: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    t: usize,
) -> Result<Tensor> {
    let (b, kv, rt, _) = qg.dims4()?;
    let s = k.dim(2)?;
    let scores = (qg.matmul(&k.t()?)? * scale)?;
    let scores = match scores.dtype() {
        DType::F16 | DType::BF16 => scores.to_dtype(DType::F32)?,
        _ => scores,
    };
    let scores = match mask {
        Some(mask) => {
            // [T, S] broadcasts as is; [B, 1, T, S] needs an axis for the R stacked heads.
            let mask = if mask.rank() == 4 { mask.unsqueeze(2)? } else { mask.clone() };
            scores
                .reshape((b, kv, rt / t, t, s))?
                .broadcast_add(&mask.to_dtype(scores.dtype())?)?
                .reshape((b, kv, rt, s))?
        }
        None => scores,
    };
    candle_nn::ops::softmax_last_dim(&scores)
        .or_else(|_| candle_nn::ops::softmax(&scores, D::Minus1))
}

/// Forward: the precomputed attention output, or whet's CPU kernel. Backward:
/// [`attention_backward`].
struct Attention {
    y: Precomputed,
    mask: Option<Tensor>,
    scale: f64,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.y.is_set() {
            return self.y.cpu();
        }
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (q, k, v) else {
            candle_core::bail!("attention kernel: f32 only")
        };
        let n = Self::dims(ql.dims(), kl.dims())?;
        let (q, k, v) = (viewed(q, ql), viewed(k, kl), viewed(v, vl));
        let y = self.cpu_forward(q, k, v, n)?;
        Ok((CpuStorage::F32(y), ql.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.y.cuda()
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.y.metal()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = attention_backward(q, k, v, dy, self.mask.as_ref(), self.scale)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
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
    if cpu_f32(q) {
        let n = Attention::dims(q.dims(), k.dims())?;
        let (q, k, v, dy) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, dy.contiguous()?);
        let mask = kernel_mask(mask)?;
        let mut ts = vec![&q, &k, &v, &dy];
        if let Some((m, _)) = &mask {
            ts.push(m);
        }
        let (dq, dk, dv) = with_f32(&ts, |s| {
            let m = mask.as_ref().map(|(_, per_sequence)| crate::attention_cpu::Mask {
                values: s[4],
                per_sequence: *per_sequence,
            });
            Ok(crate::attention_cpu::backward(s[0], s[1], s[2], s[3], m, scale as f32, n))
        })?;
        let dev = q.device();
        return Ok((
            Tensor::from_vec(dq, q.shape(), dev)?,
            Tensor::from_vec(dk, k.shape(), dev)?,
            Tensor::from_vec(dv, v.shape(), dev)?,
        ));
    }
    let (b, h, t, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let grouped = |x: &Tensor| x.detach().contiguous()?.reshape((b, kv, h / kv * t, d));
    let (qg, dyg) = (grouped(q)?, grouped(dy)?); // [B, K, R*T, D]
    let (k, v) = (k.detach().contiguous()?, v.detach().contiguous()?);
    let p = attention_weights(&qg, &k, mask, scale, t)?; // [B, K, R*T, S]
    let dv = p.to_dtype(v.dtype())?.t()?.matmul(&dyg)?; // [B, K, S, D]
    let dp = dyg.matmul(&v.t()?)?.to_dtype(p.dtype())?;
    let ds = (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)?)?;
    let ds = (ds * scale)?.to_dtype(qg.dtype())?;
    let dq = ds.matmul(&k)?.reshape((b, h, t, d))?;
    let dk = ds.t()?.matmul(&qg)?; // sums over the R heads sharing each key head
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let err = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let err = err.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap();
        assert!(err < tol, "max difference {err}");
    }

    /// Reference versions composed of candle's differentiable primitives.
    fn rms_norm_ref(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(w).unwrap()
    }

    fn rope_ref(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let cos = Tensor::cat(&[cos, cos], D::Minus1)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let sin = Tensor::cat(&[sin, sin], D::Minus1)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let half = x.dim(D::Minus1).unwrap() / 2;
        let x1 = x.narrow(D::Minus1, 0, half).unwrap();
        let x2 = x.narrow(D::Minus1, half, half).unwrap();
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
    }

    /// Each op's value and input gradient equal the composed reference's.
    #[test]
    fn ops_and_their_gradients_equal_composed_references() {
        let d = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 3, 5, 8), &d).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &d).unwrap();
        let probe = Tensor::randn(0f32, 1., (2, 3, 5, 8), &d).unwrap(); // a random output gradient
        let check = |ours: Tensor, reference: Tensor| {
            close(&ours, &reference, 1e-5);
            let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            close(g1.get(&x).unwrap(), g2.get(&x).unwrap(), 1e-4);
        };
        check(rms_norm(x.as_tensor(), &w, 1e-5).unwrap(), rms_norm_ref(x.as_tensor(), &w, 1e-5));
        // f64 takes the composed path other devices use.
        let (x64, w64) = (
            Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap(),
            w.to_dtype(DType::F64).unwrap(),
        );
        let (ours, reference) =
            (rms_norm(&x64, &w64, 1e-5).unwrap(), rms_norm_ref(&x64, &w64, 1e-5));
        close(&ours, &reference, 1e-5);
        let probe64 = probe.to_dtype(DType::F64).unwrap();
        let g1 = (ours * &probe64).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (reference * &probe64).unwrap().sum_all().unwrap().backward().unwrap();
        close(g1.get(&x64).unwrap(), g2.get(&x64).unwrap(), 1e-4);
        let cos = Tensor::randn(0f32, 1., (5, 4), &d).unwrap();
        let sin = Tensor::randn(0f32, 1., (5, 4), &d).unwrap();
        let reference = rope_ref(x.as_tensor(), &cos, &sin);
        close(&rope(x.as_tensor(), &cos, &sin).unwrap(), &reference, 1e-5);
        let want = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        close(&rope_backward(&probe, &cos, &sin).unwrap(), want.get(&x).unwrap(), 1e-5);
        let m = Tensor::randn(0f32, 1., (6, 8), &d).unwrap();
        let ours = frozen_matmul(x.as_tensor(), &m).unwrap();
        let dense = x.as_tensor().broadcast_matmul(&m.t().unwrap()).unwrap();
        close(&ours, &dense, 1e-5);
        let g = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&m).is_none(), "no gradient computed for the frozen weight");
        let want = dense.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        close(g.get(&x).unwrap(), want.get(&x).unwrap(), 1e-3);
    }

    /// Composed attention with the keys and values copied per query head, as Hugging Face's
    /// `repeat_kv` does.
    fn attention_ref(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        let rep = q.dim(1).unwrap() / k.dim(1).unwrap();
        let repeat = |x: &Tensor| {
            let (b, kv, s, d) = x.dims4().unwrap();
            Tensor::cat(&vec![x; rep], 2).unwrap().reshape((b, kv * rep, s, d)).unwrap()
        };
        let att = (q.matmul(&repeat(k).t().unwrap()).unwrap() * scale).unwrap();
        let att = att.broadcast_add(mask).unwrap();
        candle_nn::ops::softmax(&att, D::Minus1).unwrap().matmul(&repeat(v)).unwrap()
    }

    /// Grouped-query attention (6 query heads on 2 key/value heads) with a causal mask, plain
    /// and packed (per-row mask): values and the gradients of q, k and v equal the composed
    /// reference's.
    #[test]
    fn attention_and_its_gradients_equal_the_composed_reference() {
        let d = Device::Cpu;
        let q = Var::randn(0f32, 1., (2, 6, 5, 4), &d).unwrap();
        let k = Var::randn(0f32, 1., (2, 2, 5, 4), &d).unwrap();
        let v = Var::randn(0f32, 1., (2, 2, 5, 4), &d).unwrap();
        let probe = Tensor::randn(0f32, 1., (2, 6, 5, 4), &d).unwrap();
        let causal: Vec<f32> = (0..5)
            .flat_map(|i| (0..5).map(move |j| if j > i { f32::NEG_INFINITY } else { 0. }))
            .collect();
        let causal = Tensor::from_vec(causal, (5, 5), &d).unwrap();
        // Row 1 holds two packed examples, positions 0-2 and 3-4.
        let cut = Tensor::from_vec(
            (0..25).map(|n| if n / 5 >= 3 && n % 5 < 3 { f32::NEG_INFINITY } else { 0. }).collect(),
            (5, 5),
            &d,
        )
        .unwrap();
        let packed = Tensor::stack(&[causal.clone(), (&causal + cut).unwrap()], 0)
            .unwrap()
            .unsqueeze(1)
            .unwrap(); // [B, 1, T, S]
                       // f32 runs whet's CPU kernel; f64 the composed ops other devices use.
        for dtype in [DType::F32, DType::F64] {
            let cast = |x: &Var| Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let (q, k, v) = (cast(&q), cast(&k), cast(&v));
            let probe = probe.to_dtype(dtype).unwrap();
            for mask in [&causal, &packed] {
                let mask = mask.to_dtype(dtype).unwrap();
                let ours = attention(&q, &k, &v, Some(&mask), 0.5).unwrap();
                let reference = attention_ref(&q, &k, &v, &mask, 0.5);
                close(&ours, &reference, 1e-5);
                let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                for x in [&q, &k, &v] {
                    close(g1.get(x).unwrap(), g2.get(x).unwrap(), 1e-4);
                }
            }
        }
    }

    /// The CPU kernel (f32) and the composed fallback (f64) equal `silu(gate) * up`, values and
    /// gradients.
    #[test]
    fn swiglu_and_its_gradients_equal_silu_times_up() {
        for dtype in [DType::F32, DType::F64] {
            let rand = |s: f32| {
                let t = Tensor::randn(0f32, s, (3, 7, 10), &Device::Cpu).unwrap();
                Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
            };
            let (g, u) = (rand(3.0), rand(1.0));
            let probe = rand(1.0);
            let ours = swiglu(&g, &u).unwrap();
            let reference = (g.silu().unwrap() * u.as_tensor()).unwrap();
            close(&ours, &reference, 1e-5);
            let g1 = (ours * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 =
                (reference * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
            for x in [&g, &u] {
                close(g1.get(x).unwrap(), g2.get(x).unwrap(), 1e-5);
            }
        }
    }

    /// The trap these ops exist for: candle's fused kernels silently cut the graph.
    #[test]
    fn fused_kernels_alone_cut_the_graph() {
        let x = Var::randn(0f32, 1., (2, 8), &Device::Cpu).unwrap();
        let w = Tensor::ones(8, candle_core::DType::F32, &Device::Cpu).unwrap();
        let fused = candle_nn::ops::rms_norm(x.as_tensor(), &w, 1e-5)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(fused.get(&x).is_none());
        let ours =
            rms_norm(x.as_tensor(), &w, 1e-5).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(ours.get(&x).is_some());
    }
}
