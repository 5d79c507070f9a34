//! whet's CPU kernels, f32 only: each works on slices and runs on the current rayon pool.
//! [`super`] dispatches to them on the CPU in f32 unless `WHET_KERNELS=portable`.

pub(super) mod attention;
pub(super) mod cross_entropy;
pub(super) mod gemm;
pub(super) mod norm;
pub(super) mod qgemm;
pub(super) mod qgemv;
pub(super) mod swiglu;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// The values of contiguous CPU storage `data` that `layout` covers.
pub(super) fn viewed<'a>(data: &'a [f32], layout: &Layout) -> &'a [f32] {
    &data[layout.start_offset()..][..layout.shape().elem_count()]
}

/// The f32 slices of contiguous CPU tensors, for `f`.
pub(super) fn with_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = vec![];
    for (storage, layout) in &guards {
        let Storage::Cpu(CpuStorage::F32(v)) = &**storage else {
            candle_core::bail!("expected f32 tensors on the CPU")
        };
        if !layout.is_contiguous() {
            candle_core::bail!("expected contiguous tensors")
        }
        slices.push(viewed(v, layout));
    }
    f(&slices)
}
