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
unsafe fn matmul_columns(
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
    // gemm's own threads, not `matmul_wt`'s blocks: a training shard's product has hundreds
    // of rows, where the blocks measured no faster (`whet bench train --batch-size 1
    // --seq-len 512`, one shard of two threads: 197-200 tokens/s with them, 203-215 without).
    let (xs, ws) = (super::viewed(xs, xl), super::viewed(ws, wl));
    let y = matmul_pooled(m, n, k, (xs, k, 1), (ws, 1, k));
    let mut out = dims.to_vec();
    out[dims.len() - 1] = n;
    Some((CpuStorage::F32(y), Shape::from(out)))
}

/// `x [m, k] @ w^T` for a row-major `w` `[n, k]` (a linear layer's weight) at inference, on
/// the current pool's threads. On one thread, one gemm call; on several, blocks of `w`'s rows
/// (`y`'s columns) as tasks, each multiplied on its own thread ([`by_column_blocks`]). Why:
/// gemm's own threads split the rows of `x` and each packs the whole weight, which left two
/// threads little faster than one on a prompt's rows: `x` `[128, 576]` times a 576 x 576
/// weight ran 128 GFLOP/s on two threads that way and 184 in two column halves, 1536 -> 576
/// 95 and 160 (AVX-512 kernels, Intel Xeon, 2026-12-02; AVX2 kernels 0-20%). Prefill of 128
/// tokens went from 333-403 to 439-579 tokens/s (`whet bench generate --tokens 4`).
pub(in crate::ops) fn matmul_wt(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    if rayon::current_num_threads() == 1 {
        return matmul_pooled(m, n, k, (x, k, 1), (w, 1, k));
    }
    let block = (COLUMN_BLOCK_VALUES / k).max(1);
    let y = by_column_blocks(x, m, n, k, block, |r0, r1| {
        Ok::<_, std::convert::Infallible>(&w[r0 * k..r1 * k])
    });
    y.unwrap_or_else(|never| match never {})
}

/// Weight values per task of [`by_column_blocks`] (256 KiB of f32): half of a small per-core
/// L2, so a block and its packed copy stay in the core's cache while it is multiplied.
pub(in crate::ops) const COLUMN_BLOCK_VALUES: usize = 1 << 16;

/// `x [m, k] @ w^T` for a `w` `[n, k]` handed out `block` rows at a time by `rows(r0, r1)`
/// (`[r1 - r0, k]`, row-major: a slice of a dense weight, or a tile dequantized on the spot).
/// Each task of the current pool takes one block, and so `y`'s columns `r0..r1`, and
/// multiplies it on its own thread: no block moves between cores and there is no fork-join
/// per block.
pub(in crate::ops) fn by_column_blocks<B, E>(
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    block: usize,
    rows: impl Fn(usize, usize) -> Result<B, E> + Sync,
) -> Result<Vec<f32>, E>
where
    B: std::ops::Deref<Target = [f32]>,
    E: Send,
{
    use rayon::prelude::*;
    let mut y = vec![0f32; m * n];
    let dst = Columns(y.as_mut_ptr());
    let starts: Vec<usize> = (0..n).step_by(block.max(1)).collect();
    starts.into_par_iter().try_for_each(|r0| -> Result<(), E> {
        let r1 = (r0 + block).min(n);
        let w = rows(r0, r1)?;
        assert_eq!(w.len(), (r1 - r0) * k, "a block of the weight's rows");
        // SAFETY: columns `r0..r1` of `y` (`[m, n]`) are this task's alone.
        unsafe { dst.multiply(r0, n, m, r1 - r0, k, (x, k, 1), (&w, 1, k)) };
        Ok(())
    })?;
    Ok(y)
}

/// The output of [`by_column_blocks`], whose column blocks the pool's tasks write side by side.
struct Columns(*mut f32);
// SAFETY: each task writes its own columns (see `by_column_blocks`), and `y` outlives them.
unsafe impl Sync for Columns {}

impl Columns {
    /// # Safety
    /// Columns `c0..c0 + n` of the `[m, row_len]` output are the caller's alone.
    #[allow(clippy::too_many_arguments)]
    unsafe fn multiply(
        &self,
        c0: usize,
        row_len: usize,
        m: usize,
        n: usize,
        k: usize,
        lhs: Operand,
        rhs: Operand,
    ) {
        assert!(c0 + n <= row_len, "a block inside the output's rows");
        // SAFETY: as the caller vouches; the block lies inside `y`.
        unsafe { matmul_columns(self.0.add(c0), row_len, m, n, k, lhs, rhs) }
    }
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
