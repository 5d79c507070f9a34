//! The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.

use super::linear::Proj;
use super::{Ctx, Grads};
use crate::config::Config;
use crate::lora::LoraTape;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    pub(crate) gate_proj: Proj,
    pub(crate) up_proj: Proj,
    pub(crate) down_proj: Proj,
}

/// What [`Mlp::backward`] keeps from the forward pass.
pub(crate) struct MlpTape {
    gate: Tensor,
    up: Tensor,
    /// Adapter tapes of gate, up and down.
    projs: [Option<LoraTape>; 3],
}

impl Mlp {
    pub(crate) fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (c, m) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Proj::load(vb.pp("gate_proj"), c, m, false)?,
            up_proj: Proj::load(vb.pp("up_proj"), c, m, false)?,
            down_proj: Proj::load(vb.pp("down_proj"), m, c, false)?,
        })
    }

    /// The output, and what [`Mlp::backward`] needs.
    pub(crate) fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<(Tensor, MlpTape)> {
        let (gate, tg) = self.gate_proj.forward(x, ctx)?; // [B, T, M]
        let (up, tu) = self.up_proj.forward(x, ctx)?;
        let (y, td) = self.down_proj.forward(&crate::ops::swiglu(&gate, &up)?, ctx)?;
        Ok((y, MlpTape { gate, up, projs: [tg, tu, td] }))
    }

    /// The input's gradient for output gradient `g`.
    pub(crate) fn backward(&self, tape: &MlpTape, g: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let [tg, tu, td] = &tape.projs;
        let da = self.down_proj.backward(td, g, grads)?;
        let (dgate, dup) = crate::ops::swiglu_backward(&tape.gate, &tape.up, &da)?;
        self.gate_proj.backward(tg, &dgate, grads)? + self.up_proj.backward(tu, &dup, grads)?
    }

    pub(crate) fn projs(&self) -> [&Proj; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }

    pub(crate) fn projs_mut(&mut self) -> [&mut Proj; 3] {
        [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj]
    }
}
