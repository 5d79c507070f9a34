//! Matrix products with a frozen block-quantized weight (GGUF's Q8_0, Q4_0, Q4_K, ...) on the
//! CPU: the weight is dequantized one tile of rows at a time into f32 and multiplied by gemm.
//!
//! Why: candle's quantized matmul quantizes the activations and takes block dot products, the
//! right trade for one row (decoding reads each weight once per token) but about 3x slower
//! than an f32 gemm over many rows (prefill, training). Dequantizing a tile costs one pass over
//! its weights, small beside the `2 * rows` flops per weight the gemm then does, and only one
//! tile is ever held in f32, so the weight keeps its quantized size (QLoRA's memory).

use super::gemm::{by_column_blocks, gemm_strided, Operand, COLUMN_BLOCK_VALUES};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, Result};
use rayon::prelude::*;
use std::borrow::Cow;

/// f32 values per dequantized tile (2 MiB): large enough that gemm's threads have work, small
/// enough to stay in the last-level cache between dequantizing and multiplying.
const TILE_VALUES: usize = 1 << 19;

/// A quantized `[rows, cols]` weight's blocks, row after row.
pub(in crate::ops) struct QWeight<'a> {
    bytes: Cow<'a, [u8]>,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
}

impl<'a> QWeight<'a> {
    /// The blocks of `w`, a 2-D quantized tensor on the CPU whose rows are whole blocks; `None`
    /// otherwise (the caller takes the composed path).
    pub(in crate::ops) fn new(w: &'a QTensor) -> Option<Self> {
        let (rows, cols) = w.shape().dims2().ok()?;
        let dtype = w.dtype();
        if !w.device().is_cpu() || cols % dtype.block_size() != 0 {
            return None;
        }
        let bytes = w.data().ok()?;
        (bytes.len() == rows * cols / dtype.block_size() * dtype.type_size()).then_some(Self {
            bytes,
            dtype,
            rows,
            cols,
        })
    }

    pub(in crate::ops) fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    pub(in crate::ops) fn rows(&self) -> usize {
        self.rows
    }

    pub(in crate::ops) fn cols(&self) -> usize {
        self.cols
    }

    pub(in crate::ops) fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// The blocks, row after row.
    pub(in crate::ops) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Rows per tile.
    fn tile_rows(&self) -> usize {
        (TILE_VALUES / self.cols).max(1)
    }

    /// Rows `a..b` in f32, row-major, on this thread: whet's AVX2 loop for Q8_0 and Q4_0,
    /// candle's `to_float` for the other types.
    fn dequantize_rows(&self, a: usize, b: usize) -> Result<Vec<f32>> {
        let bytes = &self.bytes[a * self.row_bytes()..b * self.row_bytes()];
        if let Some(values) = super::qgemv::dequantize(self.dtype, bytes) {
            return Ok(values);
        }
        match self.dtype.from_data(Cow::Borrowed(bytes)).dequantize((b - a) * self.cols)? {
            CpuStorage::F32(v) => Ok(v),
            _ => candle_core::bail!("dequantizing {:?} gave no f32 values", self.dtype),
        }
    }

    /// Rows `r0..r1` in f32, row-major, dequantized by the pool's threads.
    fn dequantize(&self, r0: usize, r1: usize) -> Result<Vec<f32>> {
        let per_thread = (r1 - r0).div_ceil(rayon::current_num_threads()).max(1);
        let chunks: Vec<Vec<f32>> = (r0..r1)
            .step_by(per_thread)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|a| {
                let b = (a + per_thread).min(r1);
                self.dequantize_rows(a, b)
            })
            .collect::<Result<_>>()?;
        Ok(chunks.concat())
    }
}

/// Rows `ids` of `w`, in f32, one after another: an embedding lookup that dequantizes only
/// the rows it reads.
pub(in crate::ops) fn gather_rows(w: &QWeight, ids: &[u32]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(ids.len() * w.cols);
    for &id in ids {
        let r = id as usize;
        if r >= w.rows {
            candle_core::bail!("token id {id} is outside the table's {} rows", w.rows)
        }
        out.extend_from_slice(&w.dequantize_rows(r, r + 1)?);
    }
    Ok(out)
}

/// `x [m, k] @ w^T` for `w` `[n, k]`: `[m, n]`. Each task of the pool takes a tile of `w`'s
/// rows (`y`'s columns), dequantizes it into a buffer small enough to stay in its core's cache
/// and multiplies it on its own thread ([`by_column_blocks`]).
pub(in crate::ops) fn forward(x: &[f32], m: usize, w: &QWeight) -> Result<Vec<f32>> {
    let (n, k) = (w.rows, w.cols);
    by_column_blocks(x, m, n, k, (COLUMN_BLOCK_VALUES / k).max(1), |r0, r1| {
        w.dequantize_rows(r0, r1)
    })
}

/// `g [m, n] @ w` for `w` `[n, k]`: `[m, k]`, the input gradient of [`forward`]; each tile of
/// `w`'s rows adds its part.
pub(in crate::ops) fn backward(g: &[f32], m: usize, w: &QWeight) -> Result<Vec<f32>> {
    let (n, k) = (w.rows, w.cols);
    let mut dx = vec![0f32; m * k];
    for (i, r0) in (0..n).step_by(w.tile_rows()).enumerate() {
        let r1 = (r0 + w.tile_rows()).min(n);
        let tile = w.dequantize(r0, r1)?;
        let lhs: Operand = (&g[r0..], n, 1);
        gemm_strided(&mut dx, k, m, k, r1 - r0, lhs, (&tile, k, 1), i > 0);
    }
    Ok(dx)
}
