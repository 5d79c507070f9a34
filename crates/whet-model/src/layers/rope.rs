//! Rotary position embeddings (Su et al., "RoFormer", 2021), Hugging Face's "half" layout, with
//! the frequency scalings of [`crate::config::RopeScaling`].

use crate::config::Config;
use candle_core::{DType, Device, Result, Tensor};

/// Rotary position embedding tables, `[max_positions, D/2]`.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// Where the tokens of a forward pass sit in their sequences.
#[derive(Clone)]
pub(crate) enum Positions {
    /// `offset..offset+T` for every row (plain and cached decoding).
    From(usize),
    /// Per-token positions `[B, T]` (u32), for packed rows.
    Explicit(Tensor),
}

impl Rope {
    pub(crate) fn new(cfg: &Config, dtype: DType, device: &Device) -> Result<Self> {
        let inv_freq = cfg.rope_inv_freq();
        let half = inv_freq.len();
        let n = cfg.max_position_embeddings;
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions =
            Tensor::arange(0u32, n as u32, device)?.to_dtype(DType::F32)?.reshape((n, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?; // [P, D/2]
        Ok(Self { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// The cosines and sines for `B` rows of `T` tokens at `pos`: `[T, D/2]` or, for
    /// per-token positions, `[B, T, D/2]`.
    pub(crate) fn tables(&self, pos: &Positions, b: usize, t: usize) -> Result<(Tensor, Tensor)> {
        Ok(match pos {
            Positions::From(offset) => {
                (self.cos.narrow(0, *offset, t)?, self.sin.narrow(0, *offset, t)?)
            }
            Positions::Explicit(ids) => {
                // Packed rows restart positions at every example: gather per token, [B, T, D/2].
                let flat = ids.flatten_all()?;
                let half = self.cos.dim(1)?;
                (
                    self.cos.index_select(&flat, 0)?.reshape((b, t, half))?,
                    self.sin.index_select(&flat, 0)?.reshape((b, t, half))?,
                )
            }
        })
    }

    /// Rotate `x` `[B, heads, T, D]` by [`Rope::tables`].
    pub(crate) fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        crate::ops::rope(&x.contiguous()?, cos, sin)
    }

    /// The gradient of [`Rope::apply`]'s input for output gradient `g`.
    pub(crate) fn backward(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        crate::ops::rope_backward(g, cos, sin)
    }
}
