//! Products of a few f32 rows (decoding: one row per sequence) with a Q8_0 or Q4_0 weight on
//! x86-64 with AVX2: the rows are quantized to Q8_0 once per call, then every weight block is
//! decoded once and dotted with each row in 8-bit integer multiply-adds, as llama.cpp's kernels
//! do. Decoding spends most of its time here: every token reads every weight once.
//!
//! Why not candle's dot products (0.11.1): each block calls a non-inlined f16 conversion, which
//! keeps the accumulator in memory across the loop; those products ran at 0.57x llama.cpp's
//! decode speed on the same model. Other machines (no AVX2, ARM) keep candle's.

use super::qgemm::QWeight;
use candle_core::quantized::GgmlDType;
use candle_core::Result;

/// Values per Q8_0 / Q4_0 block.
const BLOCK: usize = 32;

/// Whether this CPU runs the kernels (AVX2, FMA and F16C).
pub(in crate::ops) fn available() -> bool {
    super::avx2()
}

/// Whether [`matvec`] takes weights of `dtype`.
pub(in crate::ops) fn supports(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q4_0)
}

/// Rows quantized to Q8_0: `q` the values, `d` one scale per block (rounded through f16 as
/// GGUF's Q8_0 stores it, so results match candle's and llama.cpp's products).
struct Q8Rows {
    q: Vec<i8>,
    d: Vec<f32>,
}

/// Q8_0 of `x` `[m, k]` (`k` a multiple of 32): per block `d = max|x| / 127`, `q = round(x / d)`.
fn quantize_rows(x: &[f32]) -> Q8Rows {
    let mut q = vec![0i8; x.len()];
    let mut d = Vec::with_capacity(x.len() / BLOCK);
    for (xs, qs) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale == 0.0 { 0.0 } else { 1.0 / scale };
        for (qv, xv) in qs.iter_mut().zip(xs) {
            *qv = (xv * inv).round() as i8;
        }
        d.push(half::f16::from_f32(scale).to_f32());
    }
    Q8Rows { q, d }
}

/// `x [m, k] @ w^T` for a Q8_0 or Q4_0 `w` `[n, k]`: `[m, n]`. The caller checks [`available`]
/// and [`supports`]. The weight's rows are split over candle's CPU thread pool, the one its own
/// quantized products use, which wakes in microseconds (decoding makes ~200 calls a token).
pub(in crate::ops) fn matvec(x: &[f32], m: usize, w: &QWeight) -> Result<Vec<f32>> {
    let (n, k) = (w.rows(), w.cols());
    if !(available() && supports(w.dtype())) || x.len() != m * k || k % BLOCK != 0 {
        candle_core::bail!("no quantized matrix-vector kernel for {:?} [{n}, {k}]", w.dtype())
    }
    let xq = quantize_rows(x);
    let (row_bytes, bytes, dtype) = (w.row_bytes(), w.bytes(), w.dtype());
    Ok(by_weight_rows(m, n, |rows, part| {
        let w = &bytes[rows.start * row_bytes..rows.end * row_bytes];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available()` checked AVX2, FMA and F16C.
        unsafe {
            avx2::dot_rows(dtype, w, row_bytes, &xq, m, k, part)
        };
    }))
}

/// `y [m, n]`, its weight rows (`y`'s columns) split over candle's pool: `f(rows, part)` fills
/// `part [rows, m]`, which is then written to those columns.
fn by_weight_rows(
    m: usize,
    n: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    let out = SharedOut(y.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(n, |rows| {
        let mut part = vec![0f32; rows.len() * m];
        f(rows.clone(), &mut part);
        for (j, dots) in part.chunks_exact(m).enumerate() {
            for (i, v) in dots.iter().enumerate() {
                // SAFETY: weight rows `rows` belong to this task alone, so no other thread
                // writes `y[i * n + r]`, which is inside `y`'s `m * n`.
                unsafe { out.write(i * n + rows.start + j, *v) };
            }
        }
    });
    y
}

/// `x [m, k] @ w^T` for an f32 `w` `[n, k]`, split over the same pool: decoding with f32
/// weights, where every token streams the whole model from memory and candle's matmul of one
/// row is slower than the memory allows. `None` without AVX2 and FMA.
pub(in crate::ops) fn matvec_f32(x: &[f32], m: usize, w: &[f32], k: usize) -> Option<Vec<f32>> {
    if !available() || k == 0 || x.len() != m * k || w.len() % k != 0 {
        return None;
    }
    let n = w.len() / k;
    Some(by_weight_rows(m, n, |rows, part| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available()` checked AVX2 and FMA.
        unsafe {
            avx2::dot_rows_f32(&w[rows.start * k..rows.end * k], k, x, m, part)
        };
    }))
}

/// The blocks `bytes` of a Q8_0 or Q4_0 weight, dequantized (32 values per block): the tiled
/// product's and the embedding lookup's inner loop, several times faster than candle's
/// `to_float` on these types (a non-inlined f16 conversion per block). `None` when the kernel
/// does not apply (no AVX2, another type); the caller then uses candle's.
pub(in crate::ops) fn dequantize(dtype: GgmlDType, bytes: &[u8]) -> Option<Vec<f32>> {
    if !(available() && supports(dtype)) {
        return None;
    }
    let mut out = vec![0f32; bytes.len() / dtype.type_size() * BLOCK];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available()` checked AVX2, FMA and F16C.
    unsafe {
        avx2::dequantize(dtype, bytes, &mut out)
    };
    Some(out)
}

/// `y`'s values, written by the pool's threads at distinct indices.
struct SharedOut(*mut f32);
// SAFETY: the threads write disjoint elements (see `by_weight_rows`), and `y` outlives the pool
// call.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `i` is inside the buffer and no other thread writes it.
    unsafe fn write(&self, i: usize, v: f32) {
        // SAFETY: as the caller promises.
        unsafe { *self.0.add(i) = v }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Q8Rows, BLOCK};
    use candle_core::quantized::GgmlDType;
    use std::arch::x86_64::*;

    /// `out [rows, m]`: the dots of each row of `w` (rows of `row_bytes` bytes, blocks of
    /// `dtype`) with the `m` input rows of `x`, four input rows per pass over a weight row (its
    /// blocks are decoded once for all of them).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot_rows(
        dtype: GgmlDType,
        w: &[u8],
        row_bytes: usize,
        x: &Q8Rows,
        m: usize,
        k: usize,
        out: &mut [f32],
    ) {
        match dtype {
            GgmlDType::Q4_0 => each_row::<Q4_0>(w, row_bytes, x, m, k, out),
            _ => each_row::<Q8_0>(w, row_bytes, x, m, k, out),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn each_row<B: Block>(
        w: &[u8],
        row_bytes: usize,
        x: &Q8Rows,
        m: usize,
        k: usize,
        out: &mut [f32],
    ) {
        for (wr, dots) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(m)) {
            for i0 in (0..m).step_by(4) {
                let d = &mut dots[i0..];
                match m - i0 {
                    1 => rows::<B, 1>(wr, x, i0, k, d),
                    2 => rows::<B, 2>(wr, x, i0, k, d),
                    3 => rows::<B, 3>(wr, x, i0, k, d),
                    _ => rows::<B, 4>(wr, x, i0, k, d),
                }
            }
        }
    }

    /// `out [rows, m]`: dots of each row of `w` (`k` values) with the `m` rows of `x`, up to
    /// four input rows per pass over a weight row.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot_rows_f32(w: &[f32], k: usize, x: &[f32], m: usize, out: &mut [f32]) {
        for (wr, dots) in w.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
            for i0 in (0..m).step_by(4) {
                let d = &mut dots[i0..];
                let x = &x[i0 * k..];
                match m - i0 {
                    1 => rows_f32::<1>(wr, x, d),
                    2 => rows_f32::<2>(wr, x, d),
                    3 => rows_f32::<3>(wr, x, d),
                    _ => rows_f32::<4>(wr, x, d),
                }
            }
        }
    }

    /// `R` dots of `w` (`k` values) with rows `0..R` of `x`, 16 values a step into two sets of
    /// accumulators.
    #[target_feature(enable = "avx2,fma")]
    fn rows_f32<const R: usize>(w: &[f32], x: &[f32], out: &mut [f32]) {
        let k = w.len();
        assert!(x.len() >= R * k && out.len() >= R);
        let mut a = [_mm256_setzero_ps(); R];
        let mut b = [_mm256_setzero_ps(); R];
        let mut j = 0;
        while j + 16 <= k {
            // SAFETY: values `j..j + 16` of `w` and of rows `0..R` of `x` are in bounds.
            unsafe {
                let w0 = _mm256_loadu_ps(w.as_ptr().add(j));
                let w1 = _mm256_loadu_ps(w.as_ptr().add(j + 8));
                for (r, (a, b)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
                    let p = x.as_ptr().add(r * k + j);
                    *a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p), *a);
                    *b = _mm256_fmadd_ps(w1, _mm256_loadu_ps(p.add(8)), *b);
                }
            }
            j += 16;
        }
        for (r, o) in out.iter_mut().take(R).enumerate() {
            let tail: f32 = (j..k).map(|i| w[i] * x[r * k + i]).sum();
            *o = hsum(_mm256_add_ps(a[r], b[r])) + tail;
        }
    }

    /// `out` = the blocks of `bytes`, dequantized: `scale * value`, 32 values a block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
        match dtype {
            GgmlDType::Q4_0 => dequantize_blocks::<Q4_0>(bytes, out),
            _ => dequantize_blocks::<Q8_0>(bytes, out),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn dequantize_blocks<B: Block>(bytes: &[u8], out: &mut [f32]) {
        for (blk, o) in bytes.chunks_exact(B::BYTES).zip(out.chunks_exact_mut(BLOCK)) {
            // SAFETY: `blk` is one whole block and `o` has room for its 32 values.
            unsafe {
                let p = blk.as_ptr();
                let (v, d) = (B::values(p), _mm256_set1_ps(scale(p)));
                let halves = [_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)];
                for (h, half) in halves.into_iter().enumerate() {
                    let lo = _mm256_cvtepi8_epi32(half);
                    let hi = _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(half, half));
                    let dst = o.as_mut_ptr().add(16 * h);
                    _mm256_storeu_ps(dst, _mm256_mul_ps(d, _mm256_cvtepi32_ps(lo)));
                    _mm256_storeu_ps(dst.add(8), _mm256_mul_ps(d, _mm256_cvtepi32_ps(hi)));
                }
            }
        }
    }

    /// A weight block format: its size in bytes and its 32 values as signed bytes.
    trait Block {
        const BYTES: usize;
        /// # Safety
        /// `p` points at `BYTES` readable bytes; AVX2 is present.
        unsafe fn values(p: *const u8) -> __m256i;
    }

    /// GGUF's Q8_0: an f16 scale, then 32 signed bytes.
    struct Q8_0;
    impl Block for Q8_0 {
        const BYTES: usize = 34;
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn values(p: *const u8) -> __m256i {
            // SAFETY: the caller's.
            unsafe { _mm256_loadu_si256(p.add(2) as *const __m256i) }
        }
    }

    /// GGUF's Q4_0: an f16 scale, then 16 bytes whose low nibbles are values 0..16 and high
    /// nibbles values 16..32, each stored plus 8.
    struct Q4_0;
    impl Block for Q4_0 {
        const BYTES: usize = 18;
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn values(p: *const u8) -> __m256i {
            // SAFETY: the caller's.
            let raw = unsafe { _mm_loadu_si128(p.add(2) as *const __m128i) };
            let low = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(raw, low);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
            _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8))
        }
    }

    /// The block's f16 scale.
    ///
    /// # Safety
    /// `p` points at two readable bytes.
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn scale(p: *const u8) -> f32 {
        // SAFETY: the caller's: `p` points at a block, which starts with its scale.
        let bits = unsafe { std::ptr::read_unaligned(p as *const u16) };
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// Eight lanes whose sum is the dot product of 32 signed bytes `a` and `b`: `maddubs` takes
    /// an unsigned operand, so `|a|` times `b` with `a`'s sign moved onto it.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot_i8(abs_a: __m256i, a: __m256i, b: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(abs_a, _mm256_sign_epi8(b, a));
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `R` dots of weight row `w` with input rows `i0..i0 + R`. Two sets of accumulators, for
    /// even and odd blocks, so consecutive blocks' multiply-adds do not wait on each other.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows<B: Block, const R: usize>(w: &[u8], x: &Q8Rows, i0: usize, k: usize, out: &mut [f32]) {
        let blocks = k / BLOCK;
        assert!(w.len() >= blocks * B::BYTES && x.q.len() >= (i0 + R) * k && out.len() >= R);
        let mut even = [_mm256_setzero_ps(); R];
        let mut odd = [_mm256_setzero_ps(); R];
        let mut b = 0;
        while b + 1 < blocks {
            // SAFETY: blocks `b` and `b + 1` of `w` and of rows `i0..i0 + R` are in bounds.
            unsafe {
                block::<B, R>(w, x, i0, k, b, &mut even);
                block::<B, R>(w, x, i0, k, b + 1, &mut odd);
            }
            b += 2;
        }
        if b < blocks {
            // SAFETY: as above, for the last block.
            unsafe { block::<B, R>(w, x, i0, k, b, &mut even) };
        }
        for ((o, e), d) in out.iter_mut().zip(&even).zip(&odd) {
            *o = hsum(_mm256_add_ps(*e, *d));
        }
    }

    /// Adds block `b`'s dot with input rows `i0..i0 + R` to `acc`.
    ///
    /// # Safety
    /// Block `b` of `w` and of those rows are in bounds.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block<B: Block, const R: usize>(
        w: &[u8],
        x: &Q8Rows,
        i0: usize,
        k: usize,
        b: usize,
        acc: &mut [__m256; R],
    ) {
        // SAFETY: the caller's.
        unsafe {
            let p = w.as_ptr().add(b * B::BYTES);
            let (a, dw) = (B::values(p), scale(p));
            let abs_a = _mm256_sign_epi8(a, a);
            for (r, acc) in acc.iter_mut().enumerate() {
                let row = i0 + r;
                let q = x.q.as_ptr().add(row * k + b * BLOCK);
                let v = _mm256_loadu_si256(q as *const __m256i);
                let dot = _mm256_cvtepi32_ps(dot_i8(abs_a, a, v));
                let d = _mm256_set1_ps(dw * *x.d.get_unchecked(row * (k / BLOCK) + b));
                *acc = _mm256_fmadd_ps(d, dot, *acc);
            }
        }
    }
}
