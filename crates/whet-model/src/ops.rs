//! Differentiable building blocks for training. candle 0.11.1's fused `rms_norm`,
//! `softmax_last_dim` and `rope` kernels have no backward pass (gradients silently stop there),
//! and its matmul backward also computes the gradient of frozen weights — most of the backward
//! cost of LoRA training.
//!
//! Each op here runs candle's fused kernel outside the graph and [`attach`]es the result to its
//! input with a hand-written backward: fast forwards, few saved intermediates (composing the ops
//! from differentiable primitives keeps five or six full-size tensors per norm or softmax alive
//! until the backward pass), and, for frozen matmuls, no weight gradient at all.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Result, Shape, Tensor, D,
};

type GradFn = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// `y`, computed outside the graph from `x`, made a function of `x` whose backward maps the
/// output gradient to `x`'s gradient with `grad`.
pub fn attach(x: &Tensor, y: Tensor, name: &'static str, grad: GradFn) -> Result<Tensor> {
    let y = y.contiguous()?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op2(&y, Attach { name, grad })
}

/// Forward: a copy of arg 2 (the precomputed result). Backward: `grad` for arg 1, nothing for
/// arg 2.
struct Attach {
    name: &'static str,
    grad: GradFn,
}

fn copy_of<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("attach: the precomputed result must be contiguous")
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp2 for Attach {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        s: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_of(s, l)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        copy_of(s, l)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        s: &MetalStorage,
        l: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        copy_of(s, l)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.grad)(grad)?), None))
    }
}

/// `x @ weight^T` for a frozen `weight` `[out, in]`: the backward yields `grad @ weight` for `x`
/// and nothing for the weight, which a frozen weight never needs.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let y = x.detach().broadcast_matmul(&weight.t()?)?;
    let w = weight.clone();
    attach(x, y, "frozen-matmul", Box::new(move |g| g.broadcast_matmul(&w)))
}

/// RMSNorm `x * r * weight` with `r = 1/sqrt(mean(x^2) + eps)` over the last dimension `C`;
/// gradient `r * (g*w) - x * r^3 / C * sum(g*w*x)` (the weight is frozen).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let xd = x.detach().contiguous()?;
    let y = match candle_nn::ops::rms_norm(&xd, weight, eps as f32) {
        Ok(y) => y,
        // No fused kernel for this dtype/backend (f64 in gradient checks): compose it.
        Err(_) => xd
            .broadcast_div(&(xd.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?)?
            .broadcast_mul(weight)?,
    };
    let w = weight.clone();
    attach(
        x,
        y,
        "rms-norm",
        Box::new(move |g| {
            let c = xd.dim(D::Minus1)? as f64;
            let r = (xd.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?; // [.., 1]
            let gw = g.broadcast_mul(&w)?;
            let dot = (&gw * &xd)?.sum_keepdim(D::Minus1)?; // [.., 1]
            let coef = ((r.powf(3.0)? * dot)? / c)?;
            gw.broadcast_mul(&r)? - xd.broadcast_mul(&coef)?
        }),
    )
}

/// Softmax over the last dimension; gradient `y * (g - sum(g * y))`.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let xd = x.detach().contiguous()?;
    let y = candle_nn::ops::softmax_last_dim(&xd)
        .or_else(|_| candle_nn::ops::softmax(&xd, D::Minus1))?;
    let yd = y.clone();
    attach(
        x,
        y,
        "softmax",
        Box::new(move |g| {
            let dot = (g * &yd)?.sum_keepdim(D::Minus1)?;
            yd.mul(&g.broadcast_sub(&dot)?)
        }),
    )
}

/// Rotary embedding (Hugging Face "half" layout) of `x` `[B, heads, T, D]` with `cos`/`sin`
/// `[T, D/2]` or `[B, T, D/2]`. A rotation's gradient is the inverse rotation: RoPE with `-sin`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let y = rope_any(&x.detach().contiguous()?, cos, sin)?;
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    attach(x, y, "rope", Box::new(move |g| rope_any(&g.contiguous()?, &cos, &neg_sin)))
}

/// candle's fused RoPE, or the same rotation composed where it has no kernel (f64).
fn rope_any(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let err = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
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
        check(
            softmax(x.as_tensor()).unwrap(),
            candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap(),
        );
        let cos = Tensor::randn(0f32, 1., (5, 4), &d).unwrap();
        let sin = Tensor::randn(0f32, 1., (5, 4), &d).unwrap();
        check(rope(x.as_tensor(), &cos, &sin).unwrap(), rope_ref(x.as_tensor(), &cos, &sin));
        let m = Tensor::randn(0f32, 1., (6, 8), &d).unwrap();
        let ours = frozen_matmul(x.as_tensor(), &m).unwrap();
        let dense = x.as_tensor().broadcast_matmul(&m.t().unwrap()).unwrap();
        close(&ours, &dense, 1e-5);
        let g = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&m).is_none(), "no gradient computed for the frozen weight");
        let want = dense.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        close(g.get(&x).unwrap(), want.get(&x).unwrap(), 1e-3);
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
