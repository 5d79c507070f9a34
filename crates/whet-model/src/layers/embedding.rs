//! The token embedding table: dense, or block-quantized, when the model's weights are (QLoRA
//! and `--quantize`). A quantized table dequantizes only the rows a lookup reads; tied to the
//! head, it is the head's own blocks, so the model holds the `[V, C]` table once, quantized —
//! for Qwen2.5-1.5B that is 0.93 GB of f32 not held.

use super::linear::Linear;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub(crate) enum TokenEmbedding {
    Dense(candle_nn::Embedding),
    /// Rows come out in `dtype`, the model's.
    Quantized {
        weight: Arc<QTensor>,
        dtype: DType,
        device: Device,
    },
}

impl TokenEmbedding {
    /// `weight` `[vocab, hidden]`, drawn with `std` by random presets.
    pub(crate) fn load(vb: VarBuilder, vocab: usize, hidden: usize, std: f64) -> Result<Self> {
        let init = Init::Randn { mean: 0.0, stdev: std };
        let weight = vb.get_with_hints((vocab, hidden), "weight", init)?;
        Ok(TokenEmbedding::Dense(candle_nn::Embedding::new(weight, hidden)))
    }

    /// Rows `[.., C]` of `ids` `[..]`.
    pub(crate) fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            TokenEmbedding::Dense(e) => e.forward(ids),
            TokenEmbedding::Quantized { weight, dtype, .. } => {
                crate::ops::quantized_embedding(ids, weight)?.to_dtype(*dtype)
            }
        }
    }

    /// The dense table, for writing the model out and for tying the head to it.
    pub(crate) fn dense(&self) -> Result<&Tensor> {
        match self {
            TokenEmbedding::Dense(e) => Ok(e.embeddings()),
            TokenEmbedding::Quantized { .. } => {
                candle_core::bail!("{}", super::linear::QUANTIZED_WRITE)
            }
        }
    }

    pub(crate) fn device(&self) -> &Device {
        match self {
            TokenEmbedding::Dense(e) => e.embeddings().device(),
            TokenEmbedding::Quantized { device, .. } => device,
        }
    }

    pub(crate) fn dtype(&self) -> DType {
        match self {
            TokenEmbedding::Dense(e) => e.embeddings().dtype(),
            TokenEmbedding::Quantized { dtype, .. } => *dtype,
        }
    }

    /// Quantize the table with the model's linear layers, sharing `head`'s blocks when the
    /// head is tied to it (and already quantized). Only on the CPU, where a lookup
    /// dequantizes just its rows: elsewhere the composed path would dequantize the whole
    /// table per lookup, a transient as large as what quantizing saves.
    pub(crate) fn quantize(&mut self, dtype: GgmlDType, tied_head: Option<&Linear>) -> Result<()> {
        let TokenEmbedding::Dense(e) = &*self else { return Ok(()) };
        if !e.embeddings().device().is_cpu() {
            return Ok(());
        }
        let weight = match tied_head.and_then(Linear::quantized_weight) {
            Some(w) => w.clone(),
            None => Arc::new(QTensor::quantize(&e.embeddings().to_dtype(DType::F32)?, dtype)?),
        };
        *self = TokenEmbedding::Quantized {
            weight,
            dtype: e.embeddings().dtype(),
            device: e.embeddings().device().clone(),
        };
        Ok(())
    }
}
