//! Linear layers: the frozen base weight — dense, or block-quantized for fast CPU decoding (the
//! seam QLoRA grows from) — and [`Proj`], a base optionally wrapped by a LoRA adapter.

use super::{Ctx, Grads, RowSpan};
use crate::lora::{Lora, LoraTape};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// Standard deviation of Llama's initializer, what random presets draw linear weights with.
pub(crate) const INIT_STD: f64 = 0.02;

/// A linear layer with frozen weights: dense, or block-quantized for fast CPU decoding, where
/// f32 weights make every token read the whole model from memory.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    Dense(candle_nn::Linear),
    Quantized { weight: QMatMul, bias: Option<Tensor> },
}

impl Linear {
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear::Dense(candle_nn::Linear::new(weight, bias))
    }

    /// `weight` `[out, in]` and, with `bias`, `bias` `[out]`, drawn with `std` by random presets.
    pub(crate) fn load(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        std: f64,
    ) -> Result<Self> {
        let init = Init::Randn { mean: 0.0, stdev: std };
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        let bias = if bias { Some(vb.get_with_hints(out_dim, "bias", init)?) } else { None };
        Ok(Self::new(weight, bias))
    }

    /// `x @ W^T + b`. An input that is part of a training graph gets the frozen matmul, whose
    /// backward yields the input's gradient only.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() {
            return self.forward_frozen(x);
        }
        match self {
            Linear::Dense(l) => l.forward(x),
            Linear::Quantized { weight, bias } => {
                // Quantized matmul takes f32 activations.
                let y =
                    weight.forward(&x.to_dtype(DType::F32)?.contiguous()?)?.to_dtype(x.dtype())?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }

    /// Forward whose backward yields the input's gradient only (the weight is frozen).
    pub(crate) fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) => {
                let y = crate::ops::frozen_matmul(x, l.weight())?;
                match l.bias() {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            Linear::Quantized { .. } => {
                candle_core::bail!("training through quantized weights is not supported; load the model without --quantize")
            }
        }
    }

    /// The input's gradient for output gradient `g` (the weight is frozen).
    pub(crate) fn backward(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) => crate::ops::frozen_matmul_backward(g, l.weight()),
            Linear::Quantized { .. } => {
                candle_core::bail!("training through quantized weights is not supported")
            }
        }
    }

    /// The dense weight and bias, for writing the model out; quantized weights are refused
    /// (their dequantized values are not the checkpoint's).
    pub(crate) fn dense(&self) -> Result<(&Tensor, Option<&Tensor>)> {
        match self {
            Linear::Dense(l) => Ok((l.weight(), l.bias())),
            Linear::Quantized { .. } => {
                candle_core::bail!(
                    "cannot write quantized weights out; load the model without --quantize"
                )
            }
        }
    }

    pub(crate) fn quantize(&mut self, dtype: GgmlDType) -> Result<()> {
        if let Linear::Dense(l) = self {
            let w = l.weight().to_dtype(DType::F32)?;
            let weight = QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)?;
            *self = Linear::Quantized { weight, bias: l.bias().cloned() };
        }
        Ok(())
    }
}

/// A weight shared by every projection a named adapter wraps (`f64` bits; 0 = off), so that
/// switching adapters needs no `&mut` model.
pub(crate) type AdapterWeight = std::sync::Arc<std::sync::atomic::AtomicU64>;

/// A named inference-only adapter of one projection, kept in the layout its forward pass
/// wants: decoding runs it once per token per projection, so every op saved counts.
#[derive(Debug, Clone)]
pub(crate) struct NamedLora {
    /// The model-wide id of the adapter (see [`crate::Llama::add_named_lora`]).
    pub(crate) id: usize,
    pub(crate) weight: AdapterWeight,
    /// `A^T`, `[in, r]`, contiguous.
    a_t: Tensor,
    /// `(scale B)^T`, `[r, out]`, contiguous.
    b_t: Tensor,
}

impl NamedLora {
    pub(crate) fn new(id: usize, lora: &Lora, weight: AdapterWeight) -> Result<Self> {
        let a_t = lora.a.as_tensor().detach().t()?.contiguous()?;
        let b_t = (lora.b.as_tensor().detach() * lora.scale)?.t()?.contiguous()?;
        Ok(Self { id, weight, a_t, b_t })
    }

    /// `w * scale * x A^T B^T` for `x` `[.., in]`, in `x`'s dtype.
    fn delta(&self, x: &Tensor, w: f64) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let x2 = x.to_dtype(self.a_t.dtype())?.flatten_to(dims.len() - 2)?;
        let mut h = x2.matmul(&self.a_t)?; // [N, r]: the weight costs least here
        if w != 1.0 {
            h = (h * w)?;
        }
        let y = h.matmul(&self.b_t)?;
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = y.dim(1)?;
        y.reshape(out)?.to_dtype(x.dtype())
    }
}

/// A projection inside a block: a frozen linear layer, optionally wrapped by a LoRA adapter
/// (trained, or read from a file), and by named inference-only adapters applied unmerged,
/// each scaled by its current weight — or, in a ragged batch, by each row's own choice.
#[derive(Debug, Clone)]
pub(crate) struct Proj {
    pub(crate) base: Linear,
    pub(crate) lora: Option<Lora>,
    pub(crate) named: Vec<NamedLora>,
    /// Hugging Face module path (`model.layers.0.self_attn.q_proj`), for adapter tensor names.
    pub(crate) path: String,
    pub(crate) in_dim: usize,
    pub(crate) out_dim: usize,
}

impl Proj {
    pub(crate) fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let path = vb.prefix();
        let base = Linear::load(vb, in_dim, out_dim, bias, INIT_STD)?;
        Ok(Self { base, lora: None, named: vec![], path, in_dim, out_dim })
    }

    /// The module name as LoRA targets it (`q_proj`).
    pub(crate) fn name(&self) -> &str {
        self.path.rsplit('.').next().unwrap_or("")
    }

    /// The output, and what [`Proj::backward`] needs (the adapter's tape; nothing without one).
    pub(crate) fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<(Tensor, Option<LoraTape>)> {
        let mut y =
            if ctx.training() { self.base.forward_frozen(x)? } else { self.base.forward(x)? };
        if let Some(rows) = ctx.rows {
            y = self.row_adapters(x, y, rows)?;
        } else if !ctx.training() {
            for named in &self.named {
                let w = f64::from_bits(named.weight.load(std::sync::atomic::Ordering::Relaxed));
                if w != 0.0 {
                    // x A^T B^T scale, beside the shared base: several adapters, one base.
                    let delta = named.delta(x, w)?.to_dtype(y.dtype())?;
                    y = (y + delta)?;
                }
            }
        }
        let Some(lora) = &self.lora else { return Ok((y, None)) };
        let mask = match ctx.train {
            Some(pass) if lora.dropout > 0.0 => {
                // A different mask per layer and step, all from the step's seed.
                let salt =
                    self.path.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
                Some(crate::lora::dropout_mask(
                    x.dims(),
                    lora.dropout,
                    pass.dropout_seed ^ salt,
                    pass.first_row,
                    x.device(),
                )?)
            }
            _ => None,
        };
        let (delta, tape) = lora.forward(x, mask.as_ref())?;
        let delta = delta.to_dtype(y.dtype())?;
        Ok(((y + delta)?, Some(tape)))
    }

    /// Add each ragged-batch row's own adapters to the base output `y` `[1, N, out]` of `x`
    /// `[1, N, in]`. Neighbouring rows with the same adapters share one LoRA matmul (the engine
    /// orders rows by adapter); rows without adapters cost nothing.
    fn row_adapters(&self, x: &Tensor, y: Tensor, rows: &[RowSpan]) -> Result<Tensor> {
        let mine = |r: &RowSpan| -> Vec<(&NamedLora, f64)> {
            r.adapters
                .iter()
                .filter_map(|(id, w)| self.named.iter().find(|n| n.id == *id).map(|n| (n, *w)))
                .filter(|(_, w)| *w != 0.0)
                .collect()
        };
        if rows.iter().all(|r| mine(r).is_empty()) {
            return Ok(y);
        }
        let mut pieces = vec![];
        let mut i = 0;
        while i < rows.len() {
            let adapters = mine(&rows[i]);
            let (start, mut len) = (rows[i].start, rows[i].len);
            i += 1;
            while i < rows.len() && rows[i].adapters == rows[i - 1].adapters {
                len += rows[i].len;
                i += 1;
            }
            let mut piece = y.narrow(1, start, len)?;
            for (named, w) in adapters {
                let delta = named.delta(&x.narrow(1, start, len)?, w)?;
                piece = (piece + delta.to_dtype(y.dtype())?)?;
            }
            pieces.push(piece);
        }
        Tensor::cat(&pieces, 1)
    }

    /// The input's gradient for output gradient `g`; the adapter's gradients go to `grads`.
    pub(crate) fn backward(
        &self,
        tape: &Option<LoraTape>,
        g: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let dx = self.base.backward(g)?;
        match self.adapter_backward(tape, g, true, grads)? {
            Some(d) => {
                let d = d.to_dtype(dx.dtype())?;
                dx + d
            }
            None => Ok(dx),
        }
    }

    /// The adapter's gradients, pushed to `grads`, and its part of the input's gradient when
    /// `input_grad`.
    pub(crate) fn adapter_backward(
        &self,
        tape: &Option<LoraTape>,
        g: &Tensor,
        input_grad: bool,
        grads: &mut Grads,
    ) -> Result<Option<Tensor>> {
        let (Some(lora), Some(tape)) = (&self.lora, tape) else { return Ok(None) };
        let d = lora.backward(tape, g, input_grad)?;
        grads.push((lora.a.as_tensor().clone(), d.a));
        grads.push((lora.b.as_tensor().clone(), d.b));
        Ok(d.x)
    }
}
