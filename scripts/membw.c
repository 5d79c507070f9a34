// Memory read speed of this machine, to set whet's f32 decoding speed against: decoding reads
// every weight once per token, so tokens/s x bytes of weights cannot pass this.
//   gcc -O2 -mavx2 -fopenmp scripts/membw.c -o /tmp/membw && OMP_NUM_THREADS=2 /tmp/membw
// Sums a 540 MB array (SmolLM2-135M's f32 weights) five times with AVX2 loads on every thread.
// With HUGE=1 in the environment the array is asked for in 2 MB pages (madvise), as whet asks
// for its weights' pages when it decodes.
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

int main(void) {
  size_t n = 540u * 1000 * 1000 / 4;
  size_t huge = 2u << 20, bytes = (n * 4 + huge - 1) / huge * huge;
  float *a = aligned_alloc(huge, bytes);
  if (!a) return 1;
  if (getenv("HUGE")) madvise(a, bytes, MADV_HUGEPAGE);
  for (size_t i = 0; i < n; i++) a[i] = 1.0f;
  for (int rep = 0; rep < 5; rep++) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    double total = 0;
#pragma omp parallel reduction(+ : total)
    {
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      int t = omp_get_thread_num(), nt = omp_get_num_threads();
      size_t lo = n * t / nt / 32 * 32, hi = n * (t + 1) / nt / 32 * 32;
      for (size_t i = lo; i < hi; i += 32) {
        s0 = _mm256_add_ps(s0, _mm256_load_ps(a + i));
        s1 = _mm256_add_ps(s1, _mm256_load_ps(a + i + 8));
        s2 = _mm256_add_ps(s2, _mm256_load_ps(a + i + 16));
        s3 = _mm256_add_ps(s3, _mm256_load_ps(a + i + 24));
      }
      float r[8];
      _mm256_storeu_ps(r, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
      for (int k = 0; k < 8; k++) total += r[k];
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    printf("%.1f GB/s (%.1f ms for 540 MB, sum %.0f)\n", n * 4 / s / 1e9, s * 1e3, total);
  }
  free(a);
  return 0;
}
