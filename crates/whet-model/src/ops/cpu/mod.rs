//! whet's CPU kernels, f32 only: each works on slices and runs on the current rayon pool.
//! [`super`] dispatches to them on the CPU in f32 unless `WHET_KERNELS=portable`.

pub(super) mod attention;
pub(super) mod cross_entropy;
pub(super) mod gemm;
pub(super) mod norm;
pub(super) mod qgemm;
pub(super) mod qgemv;
pub(super) mod swiglu;
pub(super) mod vmath;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// Whether this CPU has AVX2, FMA and F16C, which whet's x86-64 SIMD kernels use.
pub(super) fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

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
