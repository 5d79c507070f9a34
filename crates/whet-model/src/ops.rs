//! Differentiable building blocks for training. candle 0.11.1's fused `rms_norm`,
//! `softmax_last_dim` and `rope` kernels have no backward pass (gradients silently stop there),
//! and its matmul backward also computes the gradient of frozen weights — most of the backward
//! cost of LoRA training. These versions are built from ops that differentiate, and
//! [`frozen_matmul`] returns only the input's gradient.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Result, Shape, Tensor, D,
};

/// RMSNorm from differentiable ops: `x / sqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(weight)
}

/// Rotary embedding (Hugging Face "half" layout) from differentiable ops. `x` is
/// `[B, heads, T, D]`; `cos`/`sin` are `[T, D/2]` or `[B, T, D/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    // Broadcast over heads: [T, D] -> [1, 1, T, D]; [B, T, D] -> [B, 1, T, D].
    let (cos, sin) = if cos.rank() == 2 {
        (cos.unsqueeze(0)?.unsqueeze(0)?, sin.unsqueeze(0)?.unsqueeze(0)?)
    } else {
        (cos.unsqueeze(1)?, sin.unsqueeze(1)?)
    };
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// `x @ weight^T` for a frozen `weight` `[out, in]`: the product is computed outside the graph
/// and attached to `x` by an op whose backward yields `grad @ weight` for `x` and nothing for
/// the weight, which a frozen weight never needs.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let y = x.detach().broadcast_matmul(&weight.t()?)?.contiguous()?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op2(&y, InputGradOnly { weight: weight.clone() })
}

/// Forward: a copy of the precomputed product (arg 2). Backward: only the input (arg 1) gets a
/// gradient.
struct InputGradOnly {
    weight: Tensor,
}

fn copy_of<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("frozen_matmul: the product must be contiguous")
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp2 for InputGradOnly {
    fn name(&self) -> &'static str {
        "frozen-matmul"
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
        Ok((Some(grad.broadcast_matmul(&self.weight)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let err = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < tol, "max difference {err}");
    }

    #[test]
    fn composed_ops_equal_the_fused_kernels() {
        let d = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 5, 8), &d).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &d).unwrap();
        close(
            &rms_norm(&x, &w, 1e-5).unwrap(),
            &candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap(),
            1e-5,
        );
        let cos = Tensor::randn(0f32, 1., (5, 4), &d).unwrap();
        let sin = Tensor::randn(0f32, 1., (5, 4), &d).unwrap();
        close(
            &rope(&x, &cos, &sin).unwrap(),
            &candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap(),
            1e-5,
        );
        let cos_b = cos.unsqueeze(0).unwrap().repeat((2, 1, 1)).unwrap();
        let sin_b = sin.unsqueeze(0).unwrap().repeat((2, 1, 1)).unwrap();
        close(&rope(&x, &cos_b, &sin_b).unwrap(), &rope(&x, &cos, &sin).unwrap(), 1e-6);
    }

    /// The composed ops carry gradients where the fused kernels silently drop them.
    #[test]
    fn gradients_flow_through_composed_ops_and_frozen_matmul() {
        let d = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 4, 8), &d).unwrap();
        let w = Tensor::randn(0f32, 1., (6, 8), &d).unwrap();
        let g = Tensor::randn(1f32, 0.1, 8, &d).unwrap();
        let y = frozen_matmul(&rms_norm(x.as_tensor(), &g, 1e-5).unwrap(), &w).unwrap();
        let dense =
            rms_norm(x.as_tensor(), &g, 1e-5).unwrap().broadcast_matmul(&w.t().unwrap()).unwrap();
        close(&y, &dense, 1e-5);
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let want = dense.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        close(grads.get(&x).unwrap(), want.get(&x).unwrap(), 1e-4);
        assert!(grads.get(&w).is_none(), "no gradient computed for the frozen weight");
        let fused = candle_nn::ops::rms_norm(x.as_tensor(), &g, 1e-5)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(
            fused.get(&x).is_none(),
            "candle's fused rms_norm cuts the graph (the trap this module avoids)"
        );
    }
}
