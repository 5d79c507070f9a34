//! Exponentials over slices, eight lanes at a time with AVX2 and FMA where the CPU has them.
//!
//! Why: Rust's `f32::exp` is a call into libm per value, which the compiler cannot vectorize.
//! A CPU training step of SmolLM2-135M takes about 75M exponentials (the loss over a 49k
//! vocabulary, SwiGLU's sigmoids, attention's softmax), and libm's `expf` was 5.5% of the step
//! in `perf`. The vector form is Cephes' `expf` (Cody-Waite range reduction, a degree-6
//! polynomial), within 2 ulp of libm's; `-inf` gives exactly 0, as the masks need.

/// `x[i] = exp(x[i] - shift)`, returning their sum.
pub(in crate::ops) fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { avx2::exp_shifted(x, shift) };
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
        sum += *v;
    }
    sum
}

/// `sum(exp(x[i] - shift))`, `x` unchanged.
pub(in crate::ops) fn sum_exp_shifted(x: &[f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { avx2::sum_exp_shifted(x, shift) };
    }
    x.iter().map(|v| (v - shift).exp()).sum()
}

/// `out[i] = 1 / (1 + exp(-x[i]))`.
pub(in crate::ops) fn sigmoid(out: &mut [f32], x: &[f32]) {
    assert_eq!(out.len(), x.len(), "sigmoid: lengths");
    #[cfg(target_arch = "x86_64")]
    if super::avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { avx2::sigmoid(out, x) };
    }
    for (o, v) in out.iter_mut().zip(x) {
        *o = 1.0 / (1.0 + (-v).exp());
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `exp` of eight lanes: `x = n ln2 + r` with `|r| <= ln2 / 2`, `exp(r)` by Cephes'
    /// polynomial, times `2^n` built in two halves so that `n` may run from -150 (denormal
    /// results) to 128 without an exponent field overflowing. Below -103.98 the result is 0
    /// (also for `-inf`), above 88.73 `+inf`; NaN stays NaN.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let (lo, hi) = (_mm256_set1_ps(-103.97208), _mm256_set1_ps(88.72284));
        // max/min return their second operand when either is NaN: NaN passes through.
        let xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // r = x - n ln2, ln2 in two parts so the product with n is exact in the first.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let ni = _mm256_cvtps_epi32(n);
        let half = _mm256_srai_epi32::<1>(ni);
        let bias = _mm256_set1_epi32(127);
        let s1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(half, bias)));
        let rest = _mm256_sub_epi32(ni, half);
        let s2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(rest, bias)));
        let y = _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
        let y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo));
        _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), _mm256_cmp_ps::<_CMP_GT_OQ>(x, hi))
    }

    /// `1 / (1 + exp(-x))` of eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sigmoid8(x: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_div_ps(one, _mm256_add_ps(one, e))
    }

    /// The sum of eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// The values of `x` (at most eight), the missing lanes `fill`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load(x: &[f32], fill: f32) -> __m256 {
        let mut buf = [fill; 8];
        buf[..x.len()].copy_from_slice(x);
        // SAFETY: `buf` holds eight values.
        unsafe { _mm256_loadu_ps(buf.as_ptr()) }
    }

    /// Stores the first `out.len()` (at most eight) lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn store(out: &mut [f32], v: __m256) {
        let mut buf = [0f32; 8];
        // SAFETY: `buf` holds eight values.
        unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), v) };
        let n = out.len();
        out.copy_from_slice(&buf[..n]);
    }

    /// Eight values at `p`.
    ///
    /// # Safety
    /// `p` points at eight readable values.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller's.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` holds eight values.
            let e = exp8(_mm256_sub_ps(unsafe { load8(c.as_ptr()) }, s));
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), e) };
            acc = _mm256_add_ps(acc, e);
        }
        // The tail's missing lanes are -inf, whose exponential 0 leaves the sum as it is.
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let e = exp8(_mm256_sub_ps(load(tail, f32::NEG_INFINITY), s));
            store(tail, e);
            acc = _mm256_add_ps(acc, e);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sum_exp_shifted(x: &[f32], shift: f32) -> f32 {
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            // SAFETY: `c` holds eight values.
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(unsafe { load8(c.as_ptr()) }, s)));
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(load(tail, f32::NEG_INFINITY), s)));
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sigmoid(out: &mut [f32], x: &[f32]) {
        let (mut o, mut i) = (out.chunks_exact_mut(8), x.chunks_exact(8));
        for (oc, ic) in (&mut o).zip(&mut i) {
            // SAFETY: both chunks hold eight values.
            unsafe { _mm256_storeu_ps(oc.as_mut_ptr(), sigmoid8(load8(ic.as_ptr()))) };
        }
        let (ot, it) = (o.into_remainder(), i.remainder());
        if !it.is_empty() {
            store(ot, sigmoid8(load(it, 0.0)));
        }
    }
}
