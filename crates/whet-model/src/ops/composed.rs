//! The reference path: each op composed of candle's primitives, run on every backend. It is
//! what CUDA and Metal run (with candle's fused forward kernels where they exist), what f64
//! gradient checks run, and what `WHET_KERNELS=portable` forces on the CPU.

use candle_core::quantized::QTensor;
use candle_core::{DType, Result, Tensor, D};

/// RMSNorm's value, outside the graph: candle's fused kernel, or composed where it has none
/// (f64).
pub(super) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    match candle_nn::ops::rms_norm(x, weight, eps as f32) {
        Ok(y) => Ok(y),
        Err(_) => x
            .broadcast_div(&(x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?)?
            .broadcast_mul(weight),
    }
}

/// RMSNorm's input gradient: `r * (g*w) - x * r^3 / C * sum(g*w*x)`.
pub(super) fn rms_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    g: &Tensor,
) -> Result<Tensor> {
    let c = x.dim(D::Minus1)? as f64;
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?; // [.., 1]
    let gw = g.broadcast_mul(weight)?;
    let dot = (&gw * x)?.sum_keepdim(D::Minus1)?; // [.., 1]
    let coef = ((r.powf(3.0)? * dot)? / c)?;
    gw.broadcast_mul(&r)? - x.broadcast_mul(&coef)?
}

/// The "half"-layout rotation composed: `x * cos + rotate_half(x) * sin`.
pub(super) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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

/// SwiGLU's gradients: `du = dy * g s`, `dg = dy * u * (s + g s (1 - s))`.
pub(super) fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let sig = candle_nn::ops::sigmoid(gate)?;
    let gs = (gate * &sig)?;
    let du = (dy * &gs)?;
    let dg = ((dy * up)? * ((&sig + &gs)? - (&gs * &sig)?)?)?;
    Ok((dg, du))
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

/// Attention's value `[B, H, T, D]`, outside the graph.
pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let qg = q.detach().reshape((b, k.dim(1)?, h / k.dim(1)? * t, d))?;
    let p = attention_weights(&qg, &k.detach(), mask, scale, t)?; // [B, K, R*T, S]
    p.to_dtype(v.dtype())?.matmul(&v.detach())?.reshape((b, h, t, d))
}

/// Attention's gradients, the weights `P` recomputed.
pub(super) fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dy: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
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

/// Mean cross-entropy with its closed-form gradient `(softmax(logits) - onehot) / N`, in f32
/// whatever the logits' dtype; the gradient takes the logits' dtype.
pub(super) fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let ld = logits.detach().to_dtype(DType::F32)?;
    let max = ld.max_keepdim(D::Minus1)?;
    let lse = (ld.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?; // [N, 1]
    let picked = ld.gather(&targets.unsqueeze(1)?, 1)?; // [N, 1]
    let loss = (lse - picked)?.mean_all()?;
    let (targets, dtype) = (targets.clone(), logits.dtype());
    super::attach(
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

/// `x @ w^T` with `w` dequantized whole (in `x`'s dtype) for the product and then dropped.
pub(super) fn quantized_matmul(x: &Tensor, w: &QTensor) -> Result<Tensor> {
    let wd = w.dequantize(x.device())?.to_dtype(x.dtype())?;
    let dims = x.dims();
    let y = x.flatten_to(dims.len() - 2)?.matmul(&wd.t()?)?;
    let mut out = dims.to_vec();
    out[dims.len() - 1] = wd.dim(0)?;
    y.reshape(out)
}

/// Rows `ids` `[N]` (u32) of `table`, dequantized whole.
pub(super) fn quantized_embedding(ids: &Tensor, table: &QTensor) -> Result<Tensor> {
    table.dequantize(ids.device())?.embedding(ids)
}

/// `g @ w` with `w` dequantized whole, [`quantized_matmul`]'s input gradient.
pub(super) fn quantized_matmul_backward(g: &Tensor, w: &QTensor) -> Result<Tensor> {
    let wd = w.dequantize(g.device())?.to_dtype(g.dtype())?;
    let dims = g.dims();
    let dx = g.flatten_to(dims.len() - 2)?.matmul(&wd)?;
    let mut out = dims.to_vec();
    out[dims.len() - 1] = wd.dim(1)?;
    dx.reshape(out)
}
