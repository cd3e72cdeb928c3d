// y = x W^T for a dense bf16 weight W [n, k] and a few float32 activation rows x [rows, k]: the fp plan's
// decode step on AVX-512 BF16. The activations are rounded to bf16 once per call (as prefill's bf16
// matmul rounds them), and each (output, row) pair is one `vdpbf16ps` chain over k, in the same order
// whatever rows run beside it, so a row's outputs do not depend on its neighbours. A block of up to 4
// activation rows shares each load of a weight row, which stays in L1 for the next block: the weight
// is read from memory once per step for every row of the running set.
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

// 32 bf16 values from `at`, the lanes past `left` zero.
inline __m512bh load_bf16_pairs(const uint16_t* at, int64_t left) {
  const __mmask32 lanes = left >= 32 ? ~static_cast<__mmask32>(0) : static_cast<__mmask32>((1ull << left) - 1);
  return (__m512bh)_mm512_maskz_loadu_epi16(lanes, at);
}

// Output rows j0 .. j0 + J of activation rows m0 .. m0 + M.
template <int J, int M>
inline void dense_block(const uint16_t* w, const uint16_t* x, int64_t k, int64_t j0, int64_t m0, float* y,
                        int64_t ldy) {
  __m512 acc[J][M];
  for (int j = 0; j < J; ++j)
    for (int m = 0; m < M; ++m) acc[j][m] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 32) {
    __m512bh xv[M];
    for (int m = 0; m < M; ++m) xv[m] = load_bf16_pairs(x + (m0 + m) * k + i, k - i);
    for (int j = 0; j < J; ++j) {
      const __m512bh wv = load_bf16_pairs(w + (j0 + j) * k + i, k - i);
      for (int m = 0; m < M; ++m) acc[j][m] = _mm512_dpbf16_ps(acc[j][m], wv, xv[m]);
    }
  }
  for (int j = 0; j < J; ++j)
    for (int m = 0; m < M; ++m) y[(m0 + m) * ldy + j0 + j] = _mm512_reduce_add_ps(acc[j][m]);
}

template <int J>
inline void dense_rows(const uint16_t* w, const uint16_t* x, int64_t k, int64_t rows, int64_t j0, float* y,
                       int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) dense_block<J, 4>(w, x, k, j0, m, y, ldy);
  switch (rows - m) {
    case 3: return dense_block<J, 3>(w, x, k, j0, m, y, ldy);
    case 2: return dense_block<J, 2>(w, x, k, j0, m, y, ldy);
    case 1: return dense_block<J, 1>(w, x, k, j0, m, y, ldy);
    default: return;
  }
}

// Running sets of at least this many rows are bound by the dot products: blocks of 4 output rows then
// share each activation load. Smaller ones are bound by reading the weight from memory, which one
// stream per thread does fastest (on the 2-core Zen 4 machine, 4 interleaved rows halved the rate at
// which the head's weight streamed in, and batch-8 decode was 25 % slower).
constexpr int64_t kOutputBlockRows = 16;

// y [rows, ldy] = x W^T for x [rows, k] float32 and W [n, k] bf16, the threads splitting the n outputs;
// `scratch` holds the rows * k rounded activations.
inline void dense_bf16_matmul(const uint16_t* w, int64_t n, int64_t k, const float* x, int64_t rows, uint16_t* scratch,
                              float* y, int64_t ldy) {
  round_to_bf16(x, rows * k, scratch);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    int64_t j = begin;
    if (rows >= kOutputBlockRows)
      for (; j + 4 <= end; j += 4) dense_rows<4>(w, scratch, k, rows, j, y, ldy);
    for (; j < end; ++j) dense_rows<1>(w, scratch, k, rows, j, y, ldy);
  });
}
#endif

}  // namespace quept
