//! Linear layers: the frozen base weight — dense, or block-quantized (fast CPU decoding, and
//! QLoRA: training over a base kept in its quantized form) — and [`Proj`], a base optionally
//! wrapped by a LoRA adapter.

use super::{Ctx, Grads, RowSpan};
use crate::lora::{Lora, LoraTape};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use std::sync::Arc;

/// Standard deviation of Llama's initializer, what random presets draw linear weights with.
pub(crate) const INIT_STD: f64 = 0.02;

/// A linear layer with frozen weights: dense, or block-quantized, where f32 weights make every
/// decoded token read the whole model from memory and training hold it all in f32.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    Dense(candle_nn::Linear),
    /// `matmul` (candle's block dot products) for a few rows; `weight`, the same blocks, for
    /// the tiled f32 product over many rows and for the input gradient.
    Quantized {
        matmul: QMatMul,
        weight: Arc<QTensor>,
        bias: Option<Tensor>,
    },
}

/// Rows below which a quantized layer's product takes integer block dot products, which read
/// each weight once, rather than dequantizing tiles into an f32 gemm: decoding steps, batched
/// ones included (the engine runs up to 16 rows), and short prefill chunks. Timed by hand with
/// `ops::tests::quantized_matmul_crossover` on a 1536 x 576 layer: whet's kernel (Q8_0/Q4_0 on
/// AVX2) wins up to 32 rows and ties at 48; candle's, with candle's dequantization in the tiles
/// (what machines without that kernel run), lost from 32.
const WHET_DOT_ROWS: usize = 48;
const CANDLE_DOT_ROWS: usize = 32;
/// Rows below which a dense f32 layer takes whet's matrix-vector kernel (decoding steps) rather
/// than gemm (`ops::dense_matmul`).
const DENSE_DOT_ROWS: usize = 16;

/// Why a quantized weight is not written out: its dequantized values are not the checkpoint's.
pub(crate) const QUANTIZED_WRITE: &str =
    "cannot write quantized weights out; load the model without --quantize";

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
            Linear::Dense(l) => {
                let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
                let ours = if rows < DENSE_DOT_ROWS {
                    crate::ops::dense_matvec(x, l.weight())?
                } else {
                    crate::ops::dense_matmul(x, l.weight())?
                };
                match ours {
                    Some(y) => add_bias(y, l.bias()),
                    None => l.forward(x),
                }
            }
            Linear::Quantized { matmul, weight, bias } => {
                // Quantized products take f32 activations.
                let x32 = x.to_dtype(DType::F32)?.contiguous()?;
                let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
                let ours = if rows < WHET_DOT_ROWS {
                    crate::ops::quantized_matvec(&x32, weight)?
                } else {
                    None
                };
                let y = match ours {
                    Some(y) => y,
                    None if rows < CANDLE_DOT_ROWS => matmul.forward(&x32)?,
                    None => crate::ops::quantized_matmul(&x32, weight)?,
                };
                add_bias(y.to_dtype(x.dtype())?, bias.as_ref())
            }
        }
    }

    /// Forward whose backward yields the input's gradient only (the weight is frozen).
    pub(crate) fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) => add_bias(crate::ops::frozen_matmul(x, l.weight())?, l.bias()),
            Linear::Quantized { weight, bias, .. } => {
                let y = crate::ops::quantized_matmul(&x.to_dtype(DType::F32)?, weight)?;
                add_bias(y.to_dtype(x.dtype())?, bias.as_ref())
            }
        }
    }

    /// The input's gradient for output gradient `g` (the weight is frozen).
    pub(crate) fn backward(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) => crate::ops::frozen_matmul_backward(g, l.weight()),
            Linear::Quantized { weight, .. } => {
                let dx = crate::ops::quantized_matmul_backward(&g.to_dtype(DType::F32)?, weight)?;
                dx.to_dtype(g.dtype())
            }
        }
    }

    /// Mean cross-entropy of the logits `x @ W^T (+ b)` `[N, V]` against `targets` `[N]`,
    /// differentiable in `x`: fused with the product where `ops::linear_cross_entropy` runs
    /// (a head without bias), else the product and then `ops::cross_entropy`.
    pub(crate) fn cross_entropy(&self, x: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let fused = match self {
            Linear::Dense(l) if l.bias().is_none() => {
                crate::ops::linear_cross_entropy(x, l.weight(), targets)?
            }
            Linear::Quantized { weight, bias: None, .. } => {
                crate::ops::quantized_linear_cross_entropy(x, weight, targets)?
            }
            _ => None,
        };
        match fused {
            Some(loss) => Ok(loss),
            None => crate::ops::cross_entropy(&self.forward(x)?, targets),
        }
    }

    /// The dense weight and bias, for writing the model out; quantized weights are refused
    /// (their dequantized values are not the checkpoint's).
    pub(crate) fn dense(&self) -> Result<(&Tensor, Option<&Tensor>)> {
        match self {
            Linear::Dense(l) => Ok((l.weight(), l.bias())),
            Linear::Quantized { .. } => candle_core::bail!("{QUANTIZED_WRITE}"),
        }
    }

    /// Bytes of the weight and bias, as held (quantized blocks where quantized).
    pub(crate) fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Linear::Dense(l) => bytes(l.weight()) + l.bias().map_or(0, bytes),
            Linear::Quantized { weight, bias, .. } => {
                weight.storage_size_in_bytes() + bias.as_ref().map_or(0, bytes)
            }
        }
    }

    /// The quantized blocks, if the layer holds its weight quantized.
    pub(crate) fn quantized_weight(&self) -> Option<&Arc<QTensor>> {
        match self {
            Linear::Dense(_) => None,
            Linear::Quantized { weight, .. } => Some(weight),
        }
    }

    pub(crate) fn quantize(&mut self, dtype: GgmlDType) -> Result<()> {
        if let Linear::Dense(l) = self {
            let w = l.weight().to_dtype(DType::F32)?;
            let weight = Arc::new(QTensor::quantize(&w, dtype)?);
            let matmul = QMatMul::from_arc(weight.clone())?;
            *self = Linear::Quantized { matmul, weight, bias: l.bias().cloned() };
        }
        Ok(())
    }
}

fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

pub(crate) use crate::adapter::registry::AdapterWeight;

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
    /// `A` `[r, in]` and `(scale B)^T` as host vectors, on the CPU in f32 (see
    /// [`NamedLora::delta`]).
    host: Option<std::sync::Arc<(Vec<f32>, Vec<f32>)>>,
}

/// Rows up to which [`NamedLora::delta`] computes on the host: decoding steps.
const HOST_ROWS: usize = 32;

impl NamedLora {
    pub(crate) fn new(id: usize, lora: &Lora, weight: AdapterWeight) -> Result<Self> {
        let a = lora.a.as_tensor().detach();
        let a_t = a.t()?.contiguous()?;
        let b_t = (lora.b.as_tensor().detach() * lora.scale)?.t()?.contiguous()?;
        let host =
            (crate::ops::kernels_enabled() && a.device().is_cpu() && a.dtype() == DType::F32)
                .then(|| -> Result<_> {
                    Ok(std::sync::Arc::new((
                        a.flatten_all()?.to_vec1()?,
                        b_t.flatten_all()?.to_vec1()?,
                    )))
                })
                .transpose()?;
        Ok(Self { id, weight, a_t, b_t, host })
    }

    /// `w * scale * x A^T B^T` for `x` `[.., in]`, in `x`'s dtype. A decoding step has a row
    /// or a few: two rank-r matmuls of that size cost the thread pool's wake-up more than the
    /// arithmetic (0.65x the merged model's decode speed with 210 adapted projections), so on
    /// the CPU they are plain loops over contiguous rows.
    fn delta(&self, x: &Tensor, w: f64) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows = x.elem_count() / dims[dims.len() - 1];
        if let (Some(host), true) = (&self.host, rows <= HOST_ROWS && x.dtype() == DType::F32) {
            return self.delta_host(host, x, w as f32);
        }
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

    fn delta_host(&self, host: &(Vec<f32>, Vec<f32>), x: &Tensor, w: f32) -> Result<Tensor> {
        let (a, b_t) = host;
        let (r, inn) = self.a_t.dims2().map(|(i, r)| (r, i))?;
        let out = self.b_t.dim(1)?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let rows = xv.len() / inn;
        let mut y = vec![0f32; rows * out];
        let mut h = vec![0f32; r];
        for (xr, yr) in xv.chunks_exact(inn).zip(y.chunks_exact_mut(out)) {
            for (hj, aj) in h.iter_mut().zip(a.chunks_exact(inn)) {
                *hj = w * dot(xr, aj);
            }
            for (hj, bj) in h.iter().zip(b_t.chunks_exact(out)) {
                for (yo, bo) in yr.iter_mut().zip(bj) {
                    *yo += hj * bo;
                }
            }
        }
        let mut shape = x.dims().to_vec();
        let last = shape.len() - 1;
        shape[last] = out;
        Tensor::from_vec(y, shape, x.device())
    }
}

/// Dot product with eight partial sums, which the compiler turns into SIMD lanes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (xa, xb) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += xa[k] * xb[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A projection inside a block: a frozen linear layer, optionally wrapped by a LoRA adapter
/// (trained, or read from a file), and by named inference-only adapters applied unmerged,
/// each scaled by its current weight — or, in a ragged batch, by each row's own choice.
#[derive(Debug, Clone)]
pub(crate) struct Proj {
    pub(crate) base: Linear,
    pub(crate) lora: Option<Lora>,
    pub(crate) named: Vec<NamedLora>,
    /// A frozen adapter applied only in the reference pass (`Ctx::reference`): the copy of
    /// the adapter training started from (see [`crate::Llama::train_from_attached`]).
    pub(crate) reference: Option<NamedLora>,
    /// Hugging Face module path (`model.layers.0.self_attn.q_proj`), for adapter tensor names.
    pub(crate) path: String,
    pub(crate) in_dim: usize,
    pub(crate) out_dim: usize,
}

impl Proj {
    pub(crate) fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let path = vb.prefix();
        let base = Linear::load(vb, in_dim, out_dim, bias, INIT_STD)?;
        Ok(Self { base, lora: None, named: vec![], reference: None, path, in_dim, out_dim })
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
        if ctx.reference {
            if let Some(frozen) = &self.reference {
                let delta = frozen.delta(x, 1.0)?.to_dtype(y.dtype())?;
                y = (y + delta)?;
            }
            return Ok((y, None));
        }
        let Some(lora) = self.lora.as_ref() else {
            return Ok((y, None));
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_host_lora_delta_equals_the_matmuls() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (5, 37), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (19, 5), &dev).unwrap();
        let lora = Lora::from_tensors(&a, &b, 0.7, &dev, DType::F32).unwrap();
        let weight = AdapterWeight::default();
        let with_host = NamedLora::new(0, &lora, weight.clone()).unwrap();
        assert!(with_host.host.is_some());
        let without = NamedLora { host: None, ..with_host.clone() };
        for rows in [1, 3, HOST_ROWS] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 37), &dev).unwrap();
            let (h, m) = (with_host.delta(&x, 0.5).unwrap(), without.delta(&x, 0.5).unwrap());
            assert_eq!(h.dims(), [1, rows, 19]);
            let want = (x
                .squeeze(0)
                .unwrap()
                .matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
                * 0.35)
                .unwrap();
            let err = |t: &Tensor| {
                (t.squeeze(0).unwrap() - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(err(&h) < 1e-4 && err(&m) < 1e-4, "{} {}", err(&h), err(&m));
        }
    }
}
