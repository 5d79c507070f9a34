//! Matrix products on the CPU in f32 through the gemm crate, on slices with any strides: on this
//! thread (inside a task that is already one of many), or with the threads of the current rayon
//! pool (training shards run in pools of their own, see whet-train's `shards` module).

/// A matrix operand: slice, row stride, column stride.
pub(crate) type Operand<'a> = (&'a [f32], usize, usize);

/// `dst [m, n] = lhs [m, k] @ rhs [k, n]` on this thread.
pub(crate) fn matmul(dst: &mut [f32], m: usize, n: usize, k: usize, lhs: Operand, rhs: Operand) {
    assert!(dst.len() >= m * n, "matmul: output size");
    // SAFETY: `dst` holds `m * n` values and does not overlap the operands (a `&mut` slice).
    unsafe { gemm_into(dst.as_mut_ptr(), m, n, k, lhs, rhs, gemm::Parallelism::None) }
}

/// `lhs [m, k] @ rhs [k, n]`, `[m, n]`, with the threads of the current rayon pool.
pub(crate) fn matmul_pooled(m: usize, n: usize, k: usize, lhs: Operand, rhs: Operand) -> Vec<f32> {
    let par = match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    };
    // Not zero-filled first: gemm writes every value without reading any (`read_dst` false).
    let mut dst = Vec::with_capacity(m * n);
    // SAFETY: `dst` has room for `m * n` values, all of which gemm writes, and is fresh memory.
    unsafe {
        gemm_into(dst.as_mut_ptr(), m, n, k, lhs, rhs, par);
        dst.set_len(m * n);
    }
    dst
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
            n as isize,
            false,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}
