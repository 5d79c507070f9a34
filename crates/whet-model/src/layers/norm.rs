//! RMSNorm with a learned gain (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019).

use super::Ctx;
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    pub(crate) weight: Tensor,
    pub(crate) eps: f64,
    /// Checkpoint path of the weight (`model.norm.weight`), for writing the model out.
    pub(crate) name: String,
}

impl RmsNorm {
    pub(crate) fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        let name = format!("{}.weight", vb.prefix());
        Ok(Self { weight: vb.get_with_hints(size, "weight", Init::Const(1.0))?, eps, name })
    }

    /// Training takes whet's differentiable op; inference candle's fused kernel.
    pub(crate) fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if ctx.training() {
            crate::ops::rms_norm(x, &self.weight, self.eps)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
        }
    }

    /// The input's gradient for output gradient `g`; `x` is the forward's input.
    pub(crate) fn backward(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        crate::ops::rms_norm_backward(x, &self.weight, self.eps, g)
    }
}
