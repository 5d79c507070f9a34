//! The graph nodes whet adds to candle's autograd: a result computed outside the graph attached
//! with its own backward ([`attach`]), the frozen matmul (no weight gradient), and attention
//! (backward recomputes the weights). Backend-generic: the CPU kernels live in `cpu/`.

use super::GradFn;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, MetalStorage, Result, Shape,
    Storage, Tensor,
};
use std::sync::Mutex;

/// `y`, computed outside the graph from `x`, made a function of `x` whose backward maps the
/// output gradient (and the output) to `x`'s gradient with `grad`.
pub fn attach(x: &Tensor, y: Tensor, name: &'static str, grad: GradFn) -> Result<Tensor> {
    let y = y.contiguous()?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(Attach { name, y: Precomputed::new(Some(y)), grad })
}

/// `m`, locked; a poisoned lock (a panic while it was held) is an error.
pub(crate) fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))
}

/// A result computed before its op runs. The op's forward copies it and drops it, so the graph
/// keeps only the copy (custom ops must return fresh storage).
pub(super) struct Precomputed(Mutex<Option<Tensor>>);

impl Precomputed {
    pub(super) fn new(y: Option<Tensor>) -> Self {
        Self(Mutex::new(y))
    }

    /// Whether a result is waiting.
    fn is_set(&self) -> bool {
        self.0.lock().is_ok_and(|y| y.is_some())
    }

    fn take(&self) -> Result<Tensor> {
        let y = lock(&self.0)?.take();
        y.ok_or_else(|| candle_core::Error::Msg("precomputed result used twice".into()))
    }

    /// The storage of the result as backend `S`, copied.
    fn copy<S: BackendStorage>(&self, pick: fn(&Storage) -> Option<&S>) -> Result<(S, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        let Some(s) = pick(&storage) else {
            candle_core::bail!("precomputed result on another device")
        };
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("precomputed result must be contiguous")
        }
        Ok((s.try_clone(layout)?, layout.shape().clone()))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        self.copy(|s| if let Storage::Cpu(s) = s { Some(s) } else { None })
    }

    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        self.copy(|s| if let Storage::Cuda(s) = s { Some(s) } else { None })
    }

    fn metal(&self) -> Result<(MetalStorage, Shape)> {
        self.copy(|s| if let Storage::Metal(s) = s { Some(s) } else { None })
    }
}

/// Forward: the precomputed result. Backward: `grad`.
struct Attach {
    name: &'static str,
    y: Precomputed,
    grad: GradFn,
}

impl CustomOp1 for Attach {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.y.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.y.cuda()
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.y.metal()
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.grad)(grad, res)?))
    }
}

/// `x [.., in] @ w^T`, `w` `[out, in]`, run by the backend's matmul straight into the output;
/// its backward yields the input's gradient only.
pub(super) struct FrozenMatmul;

impl FrozenMatmul {
    fn fwd<S: BackendStorage>(x: &S, xl: &Layout, w: &S, wl: &Layout) -> Result<(S, Shape)> {
        let (n, k) = wl.shape().dims2()?;
        let dims = xl.dims();
        if !xl.is_contiguous() || dims.last() != Some(&k) {
            candle_core::bail!(
                "frozen matmul: input {:?} against weight {:?}",
                xl.shape(),
                wl.shape()
            )
        }
        let m = xl.shape().elem_count() / k;
        let lhs = Layout::contiguous_with_offset((m, k), xl.start_offset());
        let y = x.matmul(w, (1, m, n, k), &lhs, &wl.transpose(0, 1)?)?;
        let mut out = dims.to_vec();
        out[dims.len() - 1] = n;
        Ok((y, Shape::from(out)))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (x, w) else {
            return Self::fwd(x, xl, w, wl);
        };
        if !super::kernels_enabled() {
            return Self::fwd(x, xl, w, wl);
        }
        match super::cpu::gemm::frozen_matmul(xs, xl, ws, wl) {
            Some(out) => Ok(out),
            None => Self::fwd(x, xl, w, wl),
        }
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Self::fwd(x, xl, w, wl)
    }

    fn metal_fwd(
        &self,
        x: &MetalStorage,
        xl: &Layout,
        w: &MetalStorage,
        wl: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        Self::fwd(x, xl, w, wl)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(super::frozen_matmul_backward(grad, w)?), None))
    }
}

/// Forward: the precomputed attention output, or whet's CPU kernel. Backward:
/// [`super::attention_backward`].
pub(super) struct AttentionNode {
    pub(super) y: Precomputed,
    pub(super) mask: Option<Tensor>,
    pub(super) scale: f64,
}

impl CustomOp3 for AttentionNode {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.y.is_set() {
            return self.y.cpu();
        }
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (q, k, v) else {
            candle_core::bail!("attention kernel: f32 only")
        };
        let y = super::cpu::attention::forward_storage(
            (q, ql),
            (k, kl),
            v,
            vl,
            self.mask.as_ref(),
            self.scale,
        )?;
        Ok((CpuStorage::F32(y), ql.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.y.cuda()
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.y.metal()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = super::attention_backward(q, k, v, dy, self.mask.as_ref(), self.scale)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
