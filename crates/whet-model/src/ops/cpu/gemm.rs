//! Matrix products on the CPU in f32 through the gemm crate, on slices with any strides: on this
//! thread (inside a task that is already one of many), or with the threads of the current rayon
//! pool (training shards run in pools of their own, see whet-train's `shards` module).

use candle_core::{CpuStorage, Layout, Shape};

/// A matrix operand: slice, row stride, column stride.
pub(in crate::ops) type Operand<'a> = (&'a [f32], usize, usize);

/// `dst [m, n] = lhs [m, k] @ rhs [k, n]` on this thread.
pub(in crate::ops) fn matmul(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Operand,
) {
    assert!(dst.len() >= m * n, "matmul: output size");
    // SAFETY: `dst` holds `m * n` values and does not overlap the operands (a `&mut` slice).
    unsafe { gemm_into(dst.as_mut_ptr(), m, n, k, lhs, rhs, gemm::Parallelism::None) }
}

/// `dst [m, n] (+)= lhs [m, k] @ rhs [k, n]` on this thread, `dst`'s rows `dst_rs` apart
/// (added to `dst` when `accumulate`): a block of rows and columns of a larger matrix.
#[allow(clippy::too_many_arguments)]
pub(in crate::ops) fn matmul_block(
    dst: &mut [f32],
    dst_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Operand,
    accumulate: bool,
) {
    strided(dst, dst_rs, (m, n, k), lhs, rhs, accumulate, gemm::Parallelism::None)
}

/// `dst [m, n] = lhs [m, k] @ rhs [k, n]` on this thread, `dst`'s rows `dst_rs` apart: one
/// block of columns of a wider output that other threads fill beside it.
///
/// # Safety
/// `dst` must be valid for writing `(m - 1) * dst_rs + n` values, which no other thread
/// touches meanwhile, and not overlap the operands.
#[allow(clippy::too_many_arguments)]
pub(in crate::ops) unsafe fn matmul_columns(
    dst: *mut f32,
    dst_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Operand,
) {
    // SAFETY: as the caller vouches.
    unsafe { gemm_raw(dst, dst_rs, m, n, k, lhs, rhs, false, gemm::Parallelism::None) }
}

/// `lhs [m, k] @ rhs [k, n]`, `[m, n]`, with the threads of the current rayon pool.
pub(in crate::ops) fn matmul_pooled(
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Operand,
) -> Vec<f32> {
    // Not zero-filled first: gemm writes every value without reading any (`read_dst` false).
    let mut dst = Vec::with_capacity(m * n);
    // SAFETY: `dst` has room for `m * n` values, all of which gemm writes, and is fresh memory.
    unsafe {
        gemm_into(dst.as_mut_ptr(), m, n, k, lhs, rhs, pool());
        dst.set_len(m * n);
    }
    dst
}

/// `dst [m, n] (+)= lhs [m, k] @ rhs [k, n]` with the threads of the current rayon pool, `dst`'s
/// rows `dst_rs` apart (a block of columns of a wider matrix); added to `dst` when
/// `accumulate`, else written over it.
#[allow(clippy::too_many_arguments)]
pub(in crate::ops) fn gemm_strided(
    dst: &mut [f32],
    dst_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Operand,
    accumulate: bool,
) {
    strided(dst, dst_rs, (m, n, k), lhs, rhs, accumulate, pool())
}

/// The threads of the current rayon pool, as gemm takes them.
fn pool() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    }
}

/// [`matmul_block`] and [`gemm_strided`], with `par`'s threads.
fn strided(
    dst: &mut [f32],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Operand,
    rhs: Operand,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    assert!(
        m == 0 || n == 0 || ((m - 1) * dst_rs + n <= dst.len() && n <= dst_rs),
        "matmul: output size"
    );
    // SAFETY: the assertion keeps every `dst` index in bounds; a `&mut` slice overlaps nothing.
    unsafe { gemm_raw(dst.as_mut_ptr(), dst_rs, m, n, k, lhs, rhs, accumulate, par) }
}

/// The frozen matmul `x [.., k] @ w^T` (`w` `[n, k]`) on the current pool's threads (candle's
/// matmul always uses all of them); `None` when the layouts are not contiguous.
pub(in crate::ops) fn frozen_matmul(
    xs: &[f32],
    xl: &Layout,
    ws: &[f32],
    wl: &Layout,
) -> Option<(CpuStorage, Shape)> {
    let (n, k) = wl.shape().dims2().ok()?;
    let dims = xl.dims();
    if !xl.is_contiguous() || !wl.is_contiguous() || dims.last() != Some(&k) {
        return None;
    }
    let m = xl.shape().elem_count() / k;
    let (xs, ws) = (super::viewed(xs, xl), super::viewed(ws, wl));
    let y = matmul_pooled(m, n, k, (xs, k, 1), (ws, 1, k));
    let mut out = dims.to_vec();
    out[dims.len() - 1] = n;
    Some((CpuStorage::F32(y), Shape::from(out)))
}

/// `dst [m, n] = lhs [m, k] @ rhs [k, n]`, row-major `dst`.
///
/// # Safety
/// `dst` must be valid for writing `m * n` values and not overlap the operands.
unsafe fn gemm_into(
    dst: *mut f32,
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Operand,
    par: gemm::Parallelism,
) {
    // SAFETY: as the caller vouches; rows `n` apart is a dense `[m, n]`.
    unsafe { gemm_raw(dst, n, m, n, k, lhs, rhs, false, par) }
}

/// `dst [m, n] (+)= lhs [m, k] @ rhs [k, n]`, `dst`'s rows `dst_rs` apart.
///
/// # Safety
/// `dst` must be valid for reading and writing `(m - 1) * dst_rs + n` values and not overlap
/// the operands.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    dst: *mut f32,
    dst_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Operand,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    let fits = |(s, rs, cs): Operand, rows: usize, cols: usize| {
        rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < s.len()
    };
    assert!(fits(lhs, m, k) && fits(rhs, k, n), "matmul: operand sizes");
    // SAFETY: the assertion keeps every index gemm computes from these strides in bounds; the
    // caller vouches for `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            1.0, // alpha: dst = alpha * dst + beta * lhs @ rhs, dst read only when accumulating
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}
