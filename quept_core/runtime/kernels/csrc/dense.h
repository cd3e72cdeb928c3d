// y = x W^T for a dense bf16 weight W [n, k] and a few float32 activation rows x [rows, k]: the fp plan's
// decode step on AVX-512 BF16. The activations are rounded to bf16 once per call (as prefill's bf16
// matmul rounds them), and each (output, row) pair is one `vdpbf16ps` chain over k, in the same order
// whatever rows run beside it, so a row's outputs do not depend on its neighbours. Each thread streams
// one weight row at a time (on the 2-core Zen 4 machine, interleaving 4 rows halved the rate at which
// the head's weight streamed in, and blocks of 4 output rows made 16 and 32 running rows 20-30 %
// slower), and a block of up to 4 activation rows shares each load of it; the row stays in L1 for the
// next block, so the weight is read from memory once per step for every row of the running set.
#pragma once

#include "planes.h"

#include <ATen/Parallel.h>

namespace quept {

#ifdef QUEPT_AVX512
// count float32 values as bf16, rounded to nearest even (as torch's conversion).
inline void round_to_bf16(const float* from, int64_t count, uint16_t* to) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(from + i)));
  if (i < count) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (count - i)) - 1);
    _mm256_mask_storeu_epi16(to + i, tail, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(tail, from + i)));
  }
}

// 32 bf16 values from `at`, the lanes outside `lanes` zero.
inline __m512bh load_bf16_pairs(const uint16_t* at, __mmask32 lanes) {
  return (__m512bh)_mm512_maskz_loadu_epi16(lanes, at);
}

// Output j of activation rows m0 .. m0 + M.
template <int M>
inline void dense_block(const uint16_t* w, const uint16_t* x, int64_t k, int64_t j, int64_t m0, float* y,
                        int64_t ldy) {
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 32) {
    const __mmask32 lanes = k - i >= 32 ? ~static_cast<__mmask32>(0) : static_cast<__mmask32>((1ull << (k - i)) - 1);
    const __m512bh wv = load_bf16_pairs(w + j * k + i, lanes);
    for (int m = 0; m < M; ++m) acc[m] = _mm512_dpbf16_ps(acc[m], wv, load_bf16_pairs(x + (m0 + m) * k + i, lanes));
  }
  for (int m = 0; m < M; ++m) y[(m0 + m) * ldy + j] = _mm512_reduce_add_ps(acc[m]);
}

// y [rows, ldy] = x W^T for x [rows, k] float32 and W [n, k] bf16, the threads splitting the n outputs;
// `scratch` holds the rows * k rounded activations.
inline void dense_bf16_matmul(const uint16_t* w, int64_t n, int64_t k, const float* x, int64_t rows, uint16_t* scratch,
                              float* y, int64_t ldy) {
  round_to_bf16(x, rows * k, scratch);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      int64_t m = 0;
      for (; m + 4 <= rows; m += 4) dense_block<4>(w, scratch, k, j, m, y, ldy);
      switch (rows - m) {
        case 3: dense_block<3>(w, scratch, k, j, m, y, ldy); break;
        case 2: dense_block<2>(w, scratch, k, j, m, y, ldy); break;
        case 1: dense_block<1>(w, scratch, k, j, m, y, ldy); break;
        default: break;
      }
    }
  });
}
#endif

}  // namespace quept
