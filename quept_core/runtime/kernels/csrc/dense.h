// y = x W^T for a dense weight W [n, k] (bf16 or float32) and a few float32 activation rows x [rows, k]:
// the fp plan's decode step on AVX-512. A bf16 weight takes `vdpbf16ps` over activations rounded to
// bf16 once per call (as prefill's bf16 matmul rounds them); a float32 one (an engine over the
// calibrated float masters) takes float32 FMAs. Each (output, row) pair is one chain over k, in the
// same order whatever rows run beside it, so a row's outputs do not depend on its neighbours. A block
// of up to 4 activation rows shares each load of a weight row, which stays in L1 for the next block:
// the weight is read from memory once per step for every row of the running set.
#pragma once

#include "planes.h"

#include <ATen/Parallel.h>

namespace quept {

#ifdef QUEPT_AVX512
// bf16 pairs: 32 values per vector.
struct Bf16Dot {
  using Value = uint16_t;
  using Vector = __m512bh;
  static constexpr int64_t kLanes = 32;
  static Vector load(const uint16_t* at, int64_t left) {
    const __mmask32 lanes = left >= kLanes ? ~static_cast<__mmask32>(0) : static_cast<__mmask32>((1ull << left) - 1);
    return (__m512bh)_mm512_maskz_loadu_epi16(lanes, at);
  }
  static __m512 madd(__m512 acc, Vector w, Vector x) { return _mm512_dpbf16_ps(acc, w, x); }
};

// float32: 16 values per vector.
struct F32Dot {
  using Value = float;
  using Vector = __m512;
  static constexpr int64_t kLanes = 16;
  static Vector load(const float* at, int64_t left) {
    const __mmask16 lanes = left >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    return _mm512_maskz_loadu_ps(lanes, at);
  }
  static __m512 madd(__m512 acc, Vector w, Vector x) { return _mm512_fmadd_ps(w, x, acc); }
};

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

// Output rows j0 .. j0 + J of activation rows m0 .. m0 + M.
template <typename Dot, int J, int M>
inline void dense_block(const typename Dot::Value* w, const typename Dot::Value* x, int64_t k, int64_t j0, int64_t m0,
                        float* y, int64_t ldy) {
  __m512 acc[J][M];
  for (int j = 0; j < J; ++j)
    for (int m = 0; m < M; ++m) acc[j][m] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += Dot::kLanes) {
    typename Dot::Vector xv[M];
    for (int m = 0; m < M; ++m) xv[m] = Dot::load(x + (m0 + m) * k + i, k - i);
    for (int j = 0; j < J; ++j) {
      const typename Dot::Vector wv = Dot::load(w + (j0 + j) * k + i, k - i);
      for (int m = 0; m < M; ++m) acc[j][m] = Dot::madd(acc[j][m], wv, xv[m]);
    }
  }
  for (int j = 0; j < J; ++j)
    for (int m = 0; m < M; ++m) y[(m0 + m) * ldy + j0 + j] = _mm512_reduce_add_ps(acc[j][m]);
}

template <typename Dot, int J>
inline void dense_rows(const typename Dot::Value* w, const typename Dot::Value* x, int64_t k, int64_t rows, int64_t j0,
                       float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) dense_block<Dot, J, 4>(w, x, k, j0, m, y, ldy);
  switch (rows - m) {
    case 3: return dense_block<Dot, J, 3>(w, x, k, j0, m, y, ldy);
    case 2: return dense_block<Dot, J, 2>(w, x, k, j0, m, y, ldy);
    case 1: return dense_block<Dot, J, 1>(w, x, k, j0, m, y, ldy);
    default: return;
  }
}

// Running sets of at least this many rows are bound by the dot products: blocks of 4 output rows then
// share each activation load. Smaller ones are bound by reading the weight from memory, which one
// stream per thread does fastest (on the 2-core Zen 4 machine, 4 interleaved rows halved the rate at
// which the head's bf16 weight streamed in, and batch-8 decode was 25 % slower).
constexpr int64_t kOutputBlockRows = 16;

// y [rows, ldy] = x W^T over all n outputs, the threads splitting them.
template <typename Dot>
inline void dense_matmul(const typename Dot::Value* w, int64_t n, int64_t k, const typename Dot::Value* x, int64_t rows,
                         float* y, int64_t ldy) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    int64_t j = begin;
    if (rows >= kOutputBlockRows)
      for (; j + 4 <= end; j += 4) dense_rows<Dot, 4>(w, x, k, rows, j, y, ldy);
    for (; j < end; ++j) dense_rows<Dot, 1>(w, x, k, rows, j, y, ldy);
  });
}

// x [rows, k] float32 times W [n, k] bf16; `scratch` holds the rows * k rounded activations.
inline void dense_bf16_matmul(const uint16_t* w, int64_t n, int64_t k, const float* x, int64_t rows, uint16_t* scratch,
                              float* y, int64_t ldy) {
  round_to_bf16(x, rows * k, scratch);
  dense_matmul<Bf16Dot>(w, n, k, scratch, rows, y, ldy);
}

// x [rows, k] float32 times W [n, k] float32.
inline void dense_f32_matmul(const float* w, int64_t n, int64_t k, const float* x, int64_t rows, float* y,
                             int64_t ldy) {
  dense_matmul<F32Dot>(w, n, k, x, rows, y, ldy);
}
#endif

}  // namespace quept
