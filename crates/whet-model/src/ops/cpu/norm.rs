//! RMSNorm on the CPU in f32: one pass over the rows each way.

use super::{viewed, with_f32};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `1 / sqrt(mean(x^2) + eps)` of one row.
fn rms_recip(x: &[f32], eps: f32) -> f32 {
    1.0 / (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + eps).sqrt()
}

/// The forward kernel as a node of candle's graph (its backward is [`super::super::rms_norm_backward`]).
pub(in crate::ops) struct RmsNormCpu {
    pub(in crate::ops) eps: f32,
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
        Ok((Some(super::super::rms_norm_backward(x, w, self.eps as f64, g)?), None))
    }
}

/// The input gradient `r * (g*w) - x * r^3 / C * sum(g*w*x)` per row.
pub(in crate::ops) fn backward(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    g: &Tensor,
) -> Result<Tensor> {
    let (x, g) = (x.contiguous()?, g.contiguous()?);
    let c = weight.elem_count();
    let eps = eps as f32;
    let dx = with_f32(&[&x, &weight.contiguous()?, &g], |s| {
        let (x, w, g) = (s[0], s[1], s[2]);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(c).zip(x.par_chunks(c).zip(g.par_chunks(c))).for_each(|(dx, (x, g))| {
            let r = rms_recip(x, eps);
            let dot: f32 = x.iter().zip(g).zip(w).map(|((x, g), w)| g * w * x).sum();
            let coef = r * r * r / c as f32 * dot;
            for i in 0..c {
                dx[i] = r * g[i] * w[i] - x[i] * coef;
            }
        });
        Ok(dx)
    })?;
    Tensor::from_vec(dx, x.shape(), x.device())
}
