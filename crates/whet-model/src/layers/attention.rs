//! Grouped-query causal self-attention (Ainslie et al., "GQA", 2023) with rotary embeddings
//! and a key/value cache for decoding.

use super::linear::Proj;
use super::norm::RmsNorm;
use super::rope::{Positions, Rope};
use super::{Ctx, Grads};
use crate::config::Config;
use crate::lora::LoraTape;
use candle_core::{Result, Tensor};
use candle_nn::kv_cache::KvCache;
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub(crate) struct Attention {
    pub(crate) q_proj: Proj,
    pub(crate) k_proj: Proj,
    pub(crate) v_proj: Proj,
    pub(crate) o_proj: Proj,
    /// Qwen3's per-head RMSNorm on queries and keys, before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// What [`Attention::backward`] keeps from the forward pass.
pub(crate) struct AttentionTape {
    /// Queries and keys before the q/k norm, `[B, T, H, D]` and `[B, T, K, D]` (with one).
    q_raw: Option<(Tensor, Tensor)>,
    /// Rotated queries `[B, H, T, D]`, keys and values `[B, K, S, D]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The rotation's tables.
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
    /// Adapter tapes of q, k, v and o.
    projs: [Option<LoraTape>; 4],
}

impl Attention {
    pub(crate) fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (c, h, k, d) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        Ok(Self {
            q_proj: Proj::load(vb.pp("q_proj"), c, h * d, cfg.qkv_bias)?,
            k_proj: Proj::load(vb.pp("k_proj"), c, k * d, cfg.qkv_bias)?,
            v_proj: Proj::load(vb.pp("v_proj"), c, k * d, cfg.qkv_bias)?,
            o_proj: Proj::load(vb.pp("o_proj"), h * d, c, cfg.o_bias)?,
            qk_norm: if cfg.qk_norm {
                Some((
                    RmsNorm::load(vb.pp("q_norm"), d, cfg.rms_norm_eps)?,
                    RmsNorm::load(vb.pp("k_norm"), d, cfg.rms_norm_eps)?,
                ))
            } else {
                None
            },
            num_heads: h,
            num_kv_heads: k,
            head_dim: d,
        })
    }

    /// The output, and the queries, keys, values and adapter tapes a backward pass needs.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos: &Positions,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<(Tensor, AttentionTape)> {
        let (b, t, _) = x.dims3()?;
        let (h, k, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, tq) = self.q_proj.forward(x, ctx)?;
        let (kk, tk) = self.k_proj.forward(x, ctx)?;
        let (v, tv) = self.v_proj.forward(x, ctx)?;
        let (cos, sin) = rope.tables(pos, b, t)?;
        let (q, kk) = (q.reshape((b, t, h, d))?, kk.reshape((b, t, k, d))?);
        let (q, kk, q_raw) = match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q, ctx)?, kn.forward(&kk, ctx)?, Some((q, kk))),
            None => (q, kk, None),
        };
        let q = Rope::apply(&q.transpose(1, 2)?, &cos, &sin)?; // [B, H, T, D]
        let kk = Rope::apply(&kk.transpose(1, 2)?, &cos, &sin)?; // [B, K, T, D]
        let v = v.reshape((b, t, k, d))?.transpose(1, 2)?.contiguous()?;
        let (kk, v) = match cache {
            Some(cache) => cache.append(&kk, &v)?, // [B, K, S, D]
            None => (kk, v),
        };
        let y = crate::ops::attention(&q, &kk, &v, mask, self.scale())?; // [B, H, T, D]
        let y = y.transpose(1, 2)?.reshape((b, t, h * d))?;
        let (out, to) = self.o_proj.forward(&y, ctx)?;
        let tape = AttentionTape {
            q_raw,
            q,
            k: kk,
            v,
            cos,
            sin,
            mask: mask.cloned(),
            projs: [tq, tk, tv, to],
        };
        Ok((out, tape))
    }

    /// Ragged-batch forward of `x` `[1, N, C]`, the rows of `ctx.rows` laid end to end: the
    /// projections run once over all rows (the weights are read once per step, whatever the
    /// number of sequences); rotation, cache and attention run per row, each continuing its own
    /// cache (`caches[i]` for row `i`), so no row pays for another's length.
    pub(crate) fn forward_rows(
        &self,
        x: &Tensor,
        caches: &mut [&mut KvCache],
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let Some(rows) = ctx.rows else { candle_core::bail!("forward_rows needs rows") };
        let (_, n, _) = x.dims3()?;
        let (h, k, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x, ctx)?.0.reshape((1, n, h, d))?;
        let kk = self.k_proj.forward(x, ctx)?.0.reshape((1, n, k, d))?;
        let v = self.v_proj.forward(x, ctx)?.0.reshape((1, n, k, d))?;
        let (q, kk) = match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q, ctx)?, kn.forward(&kk, ctx)?),
            None => (q, kk),
        };
        let mut ys = Vec::with_capacity(rows.len());
        for (row, cache) in rows.iter().zip(caches.iter_mut()) {
            let (s, t) = (row.start, row.len);
            let q = Rope::apply(&q.narrow(1, s, t)?.transpose(1, 2)?, &row.cos, &row.sin)?;
            let kk = Rope::apply(&kk.narrow(1, s, t)?.transpose(1, 2)?, &row.cos, &row.sin)?;
            let v = v.narrow(1, s, t)?.transpose(1, 2)?.contiguous()?;
            let (kk, v) = cache.append(&kk, &v)?;
            let y = crate::ops::attention(&q, &kk, &v, row.mask.as_ref(), self.scale())?;
            ys.push(y.transpose(1, 2)?.reshape((1, t, h * d))?);
        }
        Ok(self.o_proj.forward(&Tensor::cat(&ys, 1)?, ctx)?.0)
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// The gradient of the input `x` of [`Attention::forward`] for output gradient `g`
    /// `[B, T, C]`, or only the adapters' gradients when `input_grad` is false.
    pub(crate) fn backward(
        &self,
        tape: &AttentionTape,
        g: &Tensor,
        input_grad: bool,
        grads: &mut Grads,
    ) -> Result<Option<Tensor>> {
        let (b, t, _) = g.dims3()?;
        let (h, k, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [tq, tk, tv, to] = &tape.projs;
        let dy = self.o_proj.backward(to, g, grads)?; // [B, T, H*D]
        let dy = dy.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?;
        let (dq, dk, dv) = crate::ops::attention_backward(
            &tape.q,
            &tape.k,
            &tape.v,
            &dy,
            tape.mask.as_ref(),
            self.scale(),
        )?;
        // Undo RoPE, then the q/k norm: [B, heads, T, D] -> [B, T, heads * D].
        let unrotate = |x: &Tensor, heads: usize, norm: Option<(&RmsNorm, &Tensor)>| {
            let x = Rope::backward(x, &tape.cos, &tape.sin)?.transpose(1, 2)?; // [B, T, heads, D]
            let x = match norm {
                Some((norm, raw)) => norm.backward(raw, &x.contiguous()?)?,
                None => x,
            };
            x.reshape((b, t, heads * d))
        };
        let (qn, kn) = match (&self.qk_norm, &tape.q_raw) {
            (Some((qn, kn)), Some((qr, kr))) => (Some((qn, qr)), Some((kn, kr))),
            _ => (None, None),
        };
        let dq = unrotate(&dq, h, qn)?;
        let dk = unrotate(&dk, k, kn)?;
        let dv = dv.transpose(1, 2)?.reshape((b, t, k * d))?;
        if !input_grad {
            self.q_proj.adapter_backward(tq, &dq, false, grads)?;
            self.k_proj.adapter_backward(tk, &dk, false, grads)?;
            self.v_proj.adapter_backward(tv, &dv, false, grads)?;
            return Ok(None);
        }
        let dx = (self.q_proj.backward(tq, &dq, grads)? + self.k_proj.backward(tk, &dk, grads)?)?;
        Ok(Some((dx + self.v_proj.backward(tv, &dv, grads)?)?))
    }

    pub(crate) fn projs(&self) -> [&Proj; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }

    /// The q/k norms, when the family has them.
    pub(crate) fn norms(&self) -> Vec<&RmsNorm> {
        self.qk_norm.iter().flat_map(|(q, k)| [q, k]).collect()
    }

    pub(crate) fn projs_mut(&mut self) -> [&mut Proj; 4] {
        [&mut self.q_proj, &mut self.k_proj, &mut self.v_proj, &mut self.o_proj]
    }
}
