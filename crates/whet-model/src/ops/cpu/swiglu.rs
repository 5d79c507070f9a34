//! SwiGLU on the CPU in f32, one pass each way. With `s = sigmoid(g)`: `y = g s u`,
//! `dg = dy u s (1 + g (1 - s))`, `du = dy g s`.

use super::{viewed, vmath, with_f32};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The forward kernel as a node of candle's graph.
pub(in crate::ops) struct SwiGlu;

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
                vmath::sigmoid(y, g);
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y *= g * u;
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
        let (dg, du) = super::super::swiglu_backward(g, u, dy)?;
        Ok((Some(dg), Some(du)))
    }
}

/// The gradients of gate and up for output gradient `dy`.
pub(in crate::ops) fn backward(
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (g, u, dy) = (gate.contiguous()?, up.contiguous()?, dy.contiguous()?);
    let (dg, du) = with_f32(&[&g, &u, &dy], |s| {
        let n = s[0].len();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        dg.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .zip(s[0].par_chunks(4096).zip(s[1].par_chunks(4096)).zip(s[2].par_chunks(4096)))
            .for_each(|((dg, du), ((g, u), dy))| {
                // The sigmoids first, into `du`, which each step below reads before writing.
                vmath::sigmoid(du, g);
                for i in 0..g.len() {
                    let sig = du[i];
                    du[i] = dy[i] * g[i] * sig;
                    dg[i] = dy[i] * u[i] * sig * (1.0 + g[i] * (1.0 - sig));
                }
            });
        Ok((dg, du))
    })?;
    let dev = gate.device();
    Ok((Tensor::from_vec(dg, gate.shape(), dev)?, Tensor::from_vec(du, up.shape(), dev)?))
}
