// Matrix-vector products over dense bit-plane weights (see kernels/formats.py, pack_planes).
//
// A b-bit weight row is stored as bit planes of width 4, 2 or 1 (lowest bits first). Inside each
// chunk of 64 input features, byte j of a width-w plane holds codes j, j + 8w, j + 16w, ... at
// shifts 0, w, 2w, ...: unpacking a chunk is one broadcast, shift and mask per plane.
//
//   y[m, n] = sum_g scale[n, g] * (sum_{k in g} code[n, k] * x[m, k]  -  zero[n, g] * sum_{k in g} x[m, k])
//
// With AVX-512 VNNI, the activations are quantized to int8 per chunk of 64 (a float scale each, as
// llama.cpp's Q8 blocks) and 64 code x activation products are taken per instruction (vpdpbusd),
// so unpacking the planes is most of the work and fewer bits cost less; the dense bf16 weights for
// prefill come from AVX-512 BF16 conversions. Other CPUs use portable float loops that the compiler
// vectorizes. The ops (planes.cpp) and the whole decode step (decode.cpp) share these kernels.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__) && \
    defined(__AVX512VBMI__) && \
    !defined(QUEPT_PORTABLE)
#include <immintrin.h>
#define QUEPT_AVX512 1
#endif

#include <cmath>

namespace quept {

constexpr int kChunk = 64;

// Plane widths for each bit-width, lowest bits first (must match formats.PLANES).
inline std::vector<int> plane_widths(int64_t bits) {
  switch (bits) {
    case 2: return {2};
    case 3: return {2, 1};
    case 4: return {4};
    case 5: return {4, 1};
    case 6: return {4, 2};
    case 7: return {4, 2, 1};
    case 8: return {8};
    default: TORCH_CHECK(false, "planes: bits must be in 2..8, got ", bits);
  }
}

// Calls f(std::integral_constant<int, bits>{}) for bits in 2..8: one switch for every kernel templated
// on the bit-width.
template <typename F>
inline void with_bits(int64_t bits, F&& f) {
  switch (bits) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: TORCH_CHECK(false, "kernels: bits must be in 2..8, got ", bits);
  }
}

// One packed weight [n, k] as the kernels read it.
struct Problem {
  int64_t bits = 0;
  const uint8_t* planes[3] = {nullptr, nullptr, nullptr};
  int64_t plane_stride[3] = {0, 0, 0};  // bytes per output row of each plane
  const float* scale = nullptr;         // [n, groups]
  const int16_t* zero = nullptr;        // [n, groups]
  int64_t k = 0, n = 0, groups = 0, group = 0, chunks_per_group = 0, chunks = 0;  // the last group may be cut short
};

inline Problem make_problem(at::TensorList planes, int64_t bits, int64_t k, const at::Tensor& scale,
                            const at::Tensor& zero, int64_t group) {
  const auto widths = plane_widths(bits);
  TORCH_CHECK(planes.size() == widths.size(), "planes: expected ", widths.size(), " planes");
  TORCH_CHECK(k % kChunk == 0 && group % kChunk == 0, "planes: in_features and group must be multiples of 64");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && zero.scalar_type() == at::kShort, "planes: scale f32, zero i16");
  TORCH_CHECK(scale.is_contiguous() && zero.is_contiguous(), "planes: scale and zero must be contiguous");
  Problem p;
  p.bits = bits;
  const int64_t n = scale.size(0);
  for (size_t i = 0; i < widths.size(); ++i) {
    TORCH_CHECK(planes[i].is_contiguous() && planes[i].scalar_type() == at::kByte, "planes: planes must be uint8");
    TORCH_CHECK(planes[i].numel() == n * k * widths[i] / 8, "planes: plane ", i, " has the wrong size");
    p.planes[i] = planes[i].data_ptr<uint8_t>();
    p.plane_stride[i] = k * widths[i] / 8;
  }
  p.scale = scale.data_ptr<float>();
  p.zero = zero.data_ptr<int16_t>();
  p.k = k;
  p.n = n;
  p.group = group;
  p.groups = (k + group - 1) / group;
  p.chunks_per_group = group / kChunk;
  p.chunks = k / kChunk;
  TORCH_CHECK(scale.size(1) == p.groups && zero.size(1) == p.groups, "planes: expected ", p.groups, " groups");
  return p;
}

// Activation rows as the kernel reads them. Portable path: float32 rows and their group sums.
// AVX-512 path: int8 rows, q * scale ~ x with one scale per chunk of 64, and per group the sum of
// scale * sum(q) over its chunks (the zero-point term, from exactly the values multiplied).
struct Activations {
  const float* f = nullptr;    // [rows, k]
  const int8_t* q = nullptr;   // [rows, k]
  const float* scale = nullptr;  // [rows, chunks]
  const float* sums = nullptr;   // [rows, groups]
  int64_t rows = 0;
};

// Scratch for `prepare_activations`: q [rows, k] int8, scale [rows, k / 64], sums [rows, groups].
inline void prepare_activations(const float* x, int64_t rows, int64_t k, int64_t group, int8_t* q, float* scale,
                                float* sums) {
  const int64_t chunks = k / kChunk, groups = (k + group - 1) / group, per_group = group / kChunk;
  for (int64_t m = 0; m < rows; ++m) {
    float* row_sums = sums + m * groups;
    for (int64_t g = 0; g < groups; ++g) row_sums[g] = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const float* xc = x + m * k + c * kChunk;
#ifdef QUEPT_AVX512
      __m512 v[4];
      __m512 top_v = _mm512_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm512_loadu_ps(xc + 16 * i);
        top_v = _mm512_max_ps(top_v, _mm512_abs_ps(v[i]));
      }
      const float top = _mm512_reduce_max_ps(top_v);
      const float step = top / 127.f, inverse = top > 0.f ? 127.f / top : 0.f;
      int8_t* qc = q + m * k + c * kChunk;
      __m512i count = _mm512_setzero_si512();
      for (int i = 0; i < 4; ++i) {
        // round to nearest even, as std::nearbyint
        const __m512i rounded = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], _mm512_set1_ps(inverse)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qc + 16 * i), _mm512_cvtsepi32_epi8(rounded));
        count = _mm512_add_epi32(count, rounded);
      }
      const int total = _mm512_reduce_add_epi32(count);
      scale[m * chunks + c] = step;
      row_sums[c / per_group] += step * static_cast<float>(total);
#else
      for (int j = 0; j < kChunk; ++j) row_sums[c / per_group] += xc[j];
#endif
    }
  }
}

// The codes of one chunk of one output row, one byte each (portable unpacking; also the embedding).
inline void unpack_chunk(const Problem& p, int64_t row, int64_t c, uint8_t* out) {
  std::memset(out, 0, kChunk);
  int low = 0;
  int plane = 0;
  for (int width : plane_widths(p.bits)) {
    const uint8_t* src = p.planes[plane] + row * p.plane_stride[plane] + c * 8 * width;
    const int per_byte = 8 / width, run = kChunk / per_byte, mask = (1 << width) - 1;
    for (int t = 0; t < per_byte; ++t)
      for (int j = 0; j < run; ++j) out[j + run * t] |= static_cast<uint8_t>(((src[j] >> (width * t)) & mask) << low);
    low += width;
    ++plane;
  }
}

// Row `row` of the dequantized weight, (code - zero) * scale, as float32 [k].
inline void dequant_row(const Problem& p, int64_t row, float* out) {
  alignas(64) uint8_t codes[kChunk];
  for (int64_t c = 0; c < p.chunks; ++c) {
    unpack_chunk(p, row, c, codes);
    const int64_t g = c / p.chunks_per_group;
    const float s = p.scale[row * p.groups + g], z = static_cast<float>(p.zero[row * p.groups + g]);
    for (int j = 0; j < kChunk; ++j) out[c * kChunk + j] = (static_cast<float>(codes[j]) - z) * s;
  }
}

// ---------------------------------------------------------------------------------------------
// Portable path.

#ifndef QUEPT_AVX512

constexpr int kMaxRows = 16;

// y[m, row] (row stride ldy) for output rows [begin, end).
inline void gemv_rows(const Problem& p, const Activations& a, float* y, int64_t ldy, int64_t begin, int64_t end) {
  alignas(64) uint8_t codes[kChunk];
  alignas(64) float weights[kChunk];
  for (int64_t m0 = 0; m0 < a.rows; m0 += kMaxRows) {
    const int64_t tile = std::min<int64_t>(kMaxRows, a.rows - m0);
    for (int64_t row = begin; row < end; ++row) {
      float total[kMaxRows] = {0};
      for (int64_t g = 0; g < p.groups; ++g) {
        float acc[kMaxRows] = {0};
        for (int64_t c = g * p.chunks_per_group; c < std::min((g + 1) * p.chunks_per_group, p.chunks); ++c) {
          unpack_chunk(p, row, c, codes);
          for (int j = 0; j < kChunk; ++j) weights[j] = static_cast<float>(codes[j]);
          for (int64_t m = 0; m < tile; ++m) {
            const float* xc = a.f + (m0 + m) * p.k + c * kChunk;
            float sum = 0;
            for (int j = 0; j < kChunk; ++j) sum += weights[j] * xc[j];
            acc[m] += sum;
          }
        }
        const float s = p.scale[row * p.groups + g], z = static_cast<float>(p.zero[row * p.groups + g]);
        for (int64_t m = 0; m < tile; ++m) total[m] += s * (acc[m] - z * a.sums[(m0 + m) * p.groups + g]);
      }
      for (int64_t m = 0; m < tile; ++m) y[(m0 + m) * ldy + row] = total[m];
    }
  }
}

// The dense bf16 weight, rows [begin, end).
inline void dequant_rows_bf16(const Problem& p, at::BFloat16* out, int64_t begin, int64_t end) {
  std::vector<float> row_values(p.k);
  for (int64_t row = begin; row < end; ++row) {
    dequant_row(p, row, row_values.data());
    for (int64_t i = 0; i < p.k; ++i) out[row * p.k + i] = row_values[i];
  }
}

#endif

// ---------------------------------------------------------------------------------------------
// AVX-512 BF16 path.

#ifdef QUEPT_AVX512

template <int W>
inline __m512i plane_part(const uint8_t* src) {
  if constexpr (W == 8) {
    return _mm512_loadu_si512(src);
  } else if constexpr (W == 4) {
    const __m512i bytes = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
    return _mm512_and_si512(_mm512_srlv_epi64(bytes, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0)), _mm512_set1_epi8(0x0F));
  } else if constexpr (W == 2) {
    const __m512i bytes = _mm512_broadcast_i64x2(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    return _mm512_and_si512(_mm512_srlv_epi64(bytes, _mm512_set_epi64(6, 6, 4, 4, 2, 2, 0, 0)), _mm512_set1_epi8(0x03));
  } else {
    int64_t word;
    std::memcpy(&word, src, 8);
    return _mm512_and_si512(_mm512_srlv_epi64(_mm512_set1_epi64(word), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0)),
                            _mm512_set1_epi8(0x01));
  }
}

// The 64 codes (one byte each) of chunk c of one output row.
template <int BITS>
inline __m512i chunk_codes(const uint8_t* const* rows, int64_t c) {
  if constexpr (BITS == 2) return plane_part<2>(rows[0] + c * 16);
  if constexpr (BITS == 3)
    return _mm512_or_si512(plane_part<2>(rows[0] + c * 16), _mm512_slli_epi64(plane_part<1>(rows[1] + c * 8), 2));
  if constexpr (BITS == 4) return plane_part<4>(rows[0] + c * 32);
  if constexpr (BITS == 5)
    return _mm512_or_si512(plane_part<4>(rows[0] + c * 32), _mm512_slli_epi64(plane_part<1>(rows[1] + c * 8), 4));
  if constexpr (BITS == 6)
    return _mm512_or_si512(plane_part<4>(rows[0] + c * 32), _mm512_slli_epi64(plane_part<2>(rows[1] + c * 16), 4));
  if constexpr (BITS == 7)
    return _mm512_or_si512(
        _mm512_or_si512(plane_part<4>(rows[0] + c * 32), _mm512_slli_epi64(plane_part<2>(rows[1] + c * 16), 4)),
        _mm512_slli_epi64(plane_part<1>(rows[2] + c * 8), 6));
  return plane_part<8>(rows[0] + c * 64);
}

// R activation rows at once: every unpacked chunk is used R times. Per chunk, 64 products in int32
// lanes (exact), scaled by the chunk's activation scale; per group, by the weight scale.
template <int BITS, int R>
void avx512_rows(const Problem& p, const Activations& a, int64_t m0, float* y, int64_t ldy, int64_t begin,
                 int64_t end) {
  const uint8_t* rows[3];
  for (int64_t row = begin; row < end; ++row) {
    for (int i = 0; i < 3; ++i) rows[i] = p.planes[i] ? p.planes[i] + row * p.plane_stride[i] : nullptr;
    __m512 total[R];
    float offset[R];
    for (int m = 0; m < R; ++m) {
      total[m] = _mm512_setzero_ps();
      offset[m] = 0.f;
    }
    for (int64_t g = 0; g < p.groups; ++g) {
      __m512 acc[R];
      for (int m = 0; m < R; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t c = g * p.chunks_per_group; c < std::min((g + 1) * p.chunks_per_group, p.chunks); ++c) {
        const __m512i codes = chunk_codes<BITS>(rows, c);
        for (int m = 0; m < R; ++m) {
          const __m512i xq = _mm512_loadu_si512(a.q + (m0 + m) * p.k + c * kChunk);
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xq);
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(a.scale[(m0 + m) * p.chunks + c]), acc[m]);
        }
      }
      const float s = p.scale[row * p.groups + g];
      const float z = static_cast<float>(p.zero[row * p.groups + g]);
      const __m512 sv = _mm512_set1_ps(s);
      for (int m = 0; m < R; ++m) {
        total[m] = _mm512_fmadd_ps(sv, acc[m], total[m]);
        offset[m] -= s * z * a.sums[(m0 + m) * p.groups + g];
      }
    }
    for (int m = 0; m < R; ++m) y[(m0 + m) * ldy + row] = _mm512_reduce_add_ps(total[m]) + offset[m];
  }
}

template <int BITS>
void avx512_tile(const Problem& p, const Activations& a, float* y, int64_t ldy, int64_t begin, int64_t end) {
  int64_t m0 = 0;
  for (; m0 + 4 <= a.rows; m0 += 4) avx512_rows<BITS, 4>(p, a, m0, y, ldy, begin, end);
  for (; m0 + 2 <= a.rows; m0 += 2) avx512_rows<BITS, 2>(p, a, m0, y, ldy, begin, end);
  for (; m0 < a.rows; ++m0) avx512_rows<BITS, 1>(p, a, m0, y, ldy, begin, end);
}

// y[m, row] (row stride ldy) for output rows [begin, end).
inline void gemv_rows(const Problem& p, const Activations& a, float* y, int64_t ldy, int64_t begin, int64_t end) {
  with_bits(p.bits, [&](auto b) { avx512_tile<decltype(b)::value>(p, a, y, ldy, begin, end); });
}

template <int BITS>
void avx512_dequant(const Problem& p, uint16_t* out, int64_t begin, int64_t end) {
  const uint8_t* rows[3];
  for (int64_t row = begin; row < end; ++row) {
    for (int i = 0; i < 3; ++i) rows[i] = p.planes[i] ? p.planes[i] + row * p.plane_stride[i] : nullptr;
    for (int64_t c = 0; c < p.chunks; ++c) {
      const int64_t g = c / p.chunks_per_group;
      const __m512 s = _mm512_set1_ps(p.scale[row * p.groups + g]);
      const __m512 z = _mm512_set1_ps(static_cast<float>(p.zero[row * p.groups + g]));
      const __m512i codes = chunk_codes<BITS>(rows, c);
      __m512 f[4];
      for (int i = 0; i < 4; ++i) {
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, i)));
        f[i] = _mm512_mul_ps(_mm512_sub_ps(q, z), s);
      }
      uint16_t* dst = out + row * p.k + c * kChunk;
      _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]));
      _mm512_storeu_si512(dst + 32, (__m512i)_mm512_cvtne2ps_pbh(f[3], f[2]));
    }
  }
}

// The dense bf16 weight, rows [begin, end).
inline void dequant_rows_bf16(const Problem& p, at::BFloat16* out_bf16, int64_t begin, int64_t end) {
  uint16_t* out = reinterpret_cast<uint16_t*>(out_bf16);
  with_bits(p.bits, [&](auto b) { avx512_dequant<decltype(b)::value>(p, out, begin, end); });
}

#endif

}  // namespace quept
