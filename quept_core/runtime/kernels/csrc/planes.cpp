// Matrix-vector products over dense bit-plane weights (see quept_core/kernels.py, pack_planes).
//
// A b-bit weight row is stored as bit planes of width 4, 2 or 1 (lowest bits first). Inside each
// chunk of 64 input features, byte j of a width-w plane holds codes j, j + 8w, j + 16w, ... at
// shifts 0, w, 2w, ...: unpacking a chunk is one broadcast, shift and mask per plane.
//
//   y[m, n] = sum_g scale[n, g] * (sum_{k in g} code[n, k] * x[m, k]  -  zero[n, g] * sum_{k in g} x[m, k])
//
// With AVX-512 BF16, codes become bf16 numbers and 32 products are taken per instruction; other
// CPUs use a portable loop that the compiler vectorizes.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && !defined(QUEPT_PORTABLE)
#include <immintrin.h>
#define QUEPT_AVX512_BF16 1
#endif

namespace {

constexpr int kChunk = 64;
constexpr int kMaxRows = 16;

// Plane widths for each bit-width, lowest bits first (must match kernels.PLANES).
std::vector<int> plane_widths(int64_t bits) {
  switch (bits) {
    case 2: return {2};
    case 3: return {2, 1};
    case 4: return {4};
    case 5: return {4, 1};
    case 6: return {4, 2};
    case 7: return {4, 2, 1};
    case 8: return {8};
    default: TORCH_CHECK(false, "planes_gemv: bits must be in 2..8, got ", bits);
  }
}

struct Problem {
  const uint8_t* planes[3];
  int64_t plane_stride[3];  // bytes per output row of each plane
  const float* scale;       // [n, groups]
  const int16_t* zero;      // [n, groups]
  const float* xsum;        // [rows, groups]
  int64_t k, n, groups, chunks_per_group, chunks;  // the last group may be cut short by k
};

// ---------------------------------------------------------------------------------------------
// Portable path.

#ifndef QUEPT_AVX512_BF16

inline void unpack_plane(const uint8_t* __restrict src, int width, int low, uint8_t* __restrict out) {
  switch (width) {
    case 8:
      for (int j = 0; j < kChunk; ++j) out[j] = src[j];
      break;
    case 4:
      for (int j = 0; j < 32; ++j) {
        out[j] |= static_cast<uint8_t>((src[j] & 0x0F) << low);
        out[j + 32] |= static_cast<uint8_t>((src[j] >> 4) << low);
      }
      break;
    case 2:
      for (int t = 0; t < 4; ++t)
        for (int j = 0; j < 16; ++j) out[j + 16 * t] |= static_cast<uint8_t>(((src[j] >> (2 * t)) & 0x03) << low);
      break;
    default:
      for (int t = 0; t < 8; ++t)
        for (int j = 0; j < 8; ++j) out[j + 8 * t] |= static_cast<uint8_t>(((src[j] >> t) & 0x01) << low);
  }
}

void portable_rows(const Problem& p, const std::vector<int>& widths, const float* xp, int64_t rows, float* out,
                   int64_t begin, int64_t end) {
  alignas(64) uint8_t codes[kChunk];
  alignas(64) float weights[kChunk];
  for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
    const int64_t tile = std::min<int64_t>(kMaxRows, rows - m0);
    for (int64_t row = begin; row < end; ++row) {
      float total[kMaxRows] = {0};
      for (int64_t g = 0; g < p.groups; ++g) {
        float acc[kMaxRows] = {0};
        for (int64_t c = g * p.chunks_per_group; c < std::min((g + 1) * p.chunks_per_group, p.chunks); ++c) {
          std::memset(codes, 0, kChunk);
          int low = 0;
          for (size_t i = 0; i < widths.size(); ++i) {
            unpack_plane(p.planes[i] + row * p.plane_stride[i] + c * 8 * widths[i], widths[i], low, codes);
            low += widths[i];
          }
          for (int j = 0; j < kChunk; ++j) weights[j] = static_cast<float>(codes[j]);
          for (int64_t m = 0; m < tile; ++m) {
            const float* xc = xp + (m0 + m) * p.k + c * kChunk;
            float sum = 0;
            for (int j = 0; j < kChunk; ++j) sum += weights[j] * xc[j];
            acc[m] += sum;
          }
        }
        const float s = p.scale[row * p.groups + g], z = static_cast<float>(p.zero[row * p.groups + g]);
        for (int64_t m = 0; m < tile; ++m) total[m] += s * (acc[m] - z * p.xsum[(m0 + m) * p.groups + g]);
      }
      for (int64_t m = 0; m < tile; ++m) out[(m0 + m) * p.n + row] = total[m];
    }
  }
}

void portable_dequant(const Problem& p, const std::vector<int>& widths, at::BFloat16* out, int64_t begin,
                      int64_t end) {
  alignas(64) uint8_t codes[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    for (int64_t c = 0; c < p.chunks; ++c) {
      std::memset(codes, 0, kChunk);
      int low = 0;
      for (size_t i = 0; i < widths.size(); ++i) {
        unpack_plane(p.planes[i] + row * p.plane_stride[i] + c * 8 * widths[i], widths[i], low, codes);
        low += widths[i];
      }
      const int64_t g = c / p.chunks_per_group;
      const float s = p.scale[row * p.groups + g], z = static_cast<float>(p.zero[row * p.groups + g]);
      for (int j = 0; j < kChunk; ++j) out[row * p.k + c * kChunk + j] = (static_cast<float>(codes[j]) - z) * s;
    }
  }
}

#endif

// ---------------------------------------------------------------------------------------------
// AVX-512 BF16 path.

#ifdef QUEPT_AVX512_BF16

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

// Codes as 2 x 32 bf16 numbers. Below 8 bits a code v becomes 128 + v (bit pattern 0x4300 | v, exact);
// the extra 128 * sum(x) is removed with the zero-point. 8-bit codes convert through float32 (exact).
template <int BITS>
inline void codes_to_bf16(__m512i codes, __m512i& lo, __m512i& hi) {
  if constexpr (BITS < 8) {
    const __m512i magic = _mm512_set1_epi16(0x4300);
    lo = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(codes)), magic);
    hi = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(codes, 1)), magic);
  } else {
    __m512 f[4];
    for (int i = 0; i < 4; ++i) f[i] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, i)));
    lo = (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]);
    hi = (__m512i)_mm512_cvtne2ps_pbh(f[3], f[2]);
  }
}

// R activation rows at once: every unpacked chunk is used R times.
template <int BITS, int R>
void avx512_rows(const Problem& p, const uint16_t* xp, int64_t m0, float* out, int64_t begin, int64_t end) {
  constexpr float kBias = BITS < 8 ? 128.f : 0.f;
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
      __m512 acc_lo[R], acc_hi[R];
      for (int m = 0; m < R; ++m) acc_lo[m] = acc_hi[m] = _mm512_setzero_ps();
      for (int64_t c = g * p.chunks_per_group; c < std::min((g + 1) * p.chunks_per_group, p.chunks); ++c) {
        __m512i lo, hi;
        codes_to_bf16<BITS>(chunk_codes<BITS>(rows, c), lo, hi);
        for (int m = 0; m < R; ++m) {
          const uint16_t* xc = xp + (m0 + m) * p.k + c * kChunk;
          acc_lo[m] = _mm512_dpbf16_ps(acc_lo[m], (__m512bh)lo, (__m512bh)_mm512_loadu_si512(xc));
          acc_hi[m] = _mm512_dpbf16_ps(acc_hi[m], (__m512bh)hi, (__m512bh)_mm512_loadu_si512(xc + 32));
        }
      }
      const float s = p.scale[row * p.groups + g];
      const float z = static_cast<float>(p.zero[row * p.groups + g]) + kBias;
      const __m512 sv = _mm512_set1_ps(s);
      for (int m = 0; m < R; ++m) {
        total[m] = _mm512_fmadd_ps(sv, _mm512_add_ps(acc_lo[m], acc_hi[m]), total[m]);
        offset[m] -= s * z * p.xsum[(m0 + m) * p.groups + g];
      }
    }
    for (int m = 0; m < R; ++m) out[(m0 + m) * p.n + row] = _mm512_reduce_add_ps(total[m]) + offset[m];
  }
}

template <int BITS>
void avx512_tile(const Problem& p, const uint16_t* xp, int64_t rows, float* out, int64_t begin, int64_t end) {
  int64_t m0 = 0;
  for (; m0 + 4 <= rows; m0 += 4) avx512_rows<BITS, 4>(p, xp, m0, out, begin, end);
  for (; m0 + 2 <= rows; m0 += 2) avx512_rows<BITS, 2>(p, xp, m0, out, begin, end);
  for (; m0 < rows; ++m0) avx512_rows<BITS, 1>(p, xp, m0, out, begin, end);
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

void avx512_dequant_dispatch(int64_t bits, const Problem& p, uint16_t* out, int64_t begin, int64_t end) {
  switch (bits) {
    case 2: return avx512_dequant<2>(p, out, begin, end);
    case 3: return avx512_dequant<3>(p, out, begin, end);
    case 4: return avx512_dequant<4>(p, out, begin, end);
    case 5: return avx512_dequant<5>(p, out, begin, end);
    case 6: return avx512_dequant<6>(p, out, begin, end);
    case 7: return avx512_dequant<7>(p, out, begin, end);
    default: return avx512_dequant<8>(p, out, begin, end);
  }
}

void avx512_dispatch(int64_t bits, const Problem& p, const uint16_t* xp, int64_t rows, float* out, int64_t begin,
                     int64_t end) {
  switch (bits) {
    case 2: return avx512_tile<2>(p, xp, rows, out, begin, end);
    case 3: return avx512_tile<3>(p, xp, rows, out, begin, end);
    case 4: return avx512_tile<4>(p, xp, rows, out, begin, end);
    case 5: return avx512_tile<5>(p, xp, rows, out, begin, end);
    case 6: return avx512_tile<6>(p, xp, rows, out, begin, end);
    case 7: return avx512_tile<7>(p, xp, rows, out, begin, end);
    default: return avx512_tile<8>(p, xp, rows, out, begin, end);
  }
}

#endif

// ---------------------------------------------------------------------------------------------

Problem make_problem(at::TensorList planes, const std::vector<int>& widths, int64_t k, const at::Tensor& scale,
                     const at::Tensor& zero, int64_t group) {
  TORCH_CHECK(planes.size() == widths.size(), "planes: expected ", widths.size(), " planes");
  TORCH_CHECK(k % kChunk == 0 && group % kChunk == 0, "planes: in_features and group must be multiples of 64");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && zero.scalar_type() == at::kShort, "planes: scale f32, zero i16");
  TORCH_CHECK(scale.is_contiguous() && zero.is_contiguous(), "planes: scale and zero must be contiguous");
  Problem p{};
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
  p.groups = (k + group - 1) / group;
  p.chunks_per_group = group / kChunk;
  p.chunks = k / kChunk;
  TORCH_CHECK(scale.size(1) == p.groups && zero.size(1) == p.groups, "planes: expected ", p.groups, " groups");
  return p;
}

at::Tensor planes_gemv(const at::Tensor& x, at::TensorList planes, int64_t bits, const at::Tensor& scale,
                       const at::Tensor& zero, int64_t group) {
  const auto widths = plane_widths(bits);
  TORCH_CHECK(x.dim() == 2, "planes_gemv: x must be [rows, in_features]");
  const int64_t rows = x.size(0), k = x.size(1);
  Problem p = make_problem(planes, widths, k, scale, zero, group);

  // Group sums of the activations, as the kernel sees them (bf16 on the AVX-512 path).
#ifdef QUEPT_AVX512_BF16
  const at::Tensor xs = x.to(at::kBFloat16).contiguous();
  const at::Tensor xf = xs.to(at::kFloat);
#else
  const at::Tensor xf = x.to(at::kFloat).contiguous();
#endif
  const at::Tensor xsum =
      at::constant_pad_nd(xf, {0, p.groups * group - k}).view({rows, p.groups, group}).sum(-1).contiguous();
  p.xsum = xsum.data_ptr<float>();

  at::Tensor out = at::empty({rows, p.n}, xf.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, p.n, 16, [&](int64_t begin, int64_t end) {
#ifdef QUEPT_AVX512_BF16
    avx512_dispatch(bits, p, reinterpret_cast<const uint16_t*>(xs.data_ptr<at::BFloat16>()), rows, op, begin, end);
#else
    portable_rows(p, widths, xf.data_ptr<float>(), rows, op, begin, end);
#endif
  });
  return out.to(x.scalar_type());
}

// The dense bf16 weight [n, in_features]: (code - zero) * scale.
at::Tensor planes_dequant(at::TensorList planes, int64_t bits, const at::Tensor& scale, const at::Tensor& zero,
                          int64_t group, int64_t in_features) {
  const auto widths = plane_widths(bits);
  Problem p = make_problem(planes, widths, in_features, scale, zero, group);
  at::Tensor out = at::empty({p.n, in_features}, scale.options().dtype(at::kBFloat16));
  at::parallel_for(0, p.n, 16, [&](int64_t begin, int64_t end) {
#ifdef QUEPT_AVX512_BF16
    avx512_dequant_dispatch(bits, p, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), begin, end);
#else
    portable_dequant(p, widths, out.data_ptr<at::BFloat16>(), begin, end);
#endif
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// PyTorch's CPU int4 layout (aten._convert_weight_to_int4pack_for_cpu): blocks of 64 output rows,
// byte (k, j) of a block holding rows j (low nibble) and j + 32 (high nibble) at input k.
// w = (c - 8) * s + m per group, with scale_zero [groups, n, 2] = (s, m) in bf16.

at::Tensor int4pack_dequant(const at::Tensor& packed, const at::Tensor& scale_zero, int64_t group) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "int4pack_dequant: packed uint8");
  TORCH_CHECK(scale_zero.scalar_type() == at::kBFloat16 && scale_zero.is_contiguous(), "int4pack_dequant: bf16");
  const int64_t n = packed.size(0), k = packed.size(1) * 2;
  TORCH_CHECK(n % 64 == 0 && k % group == 0, "int4pack_dequant: rows must be a multiple of 64");
  TORCH_CHECK(scale_zero.size(0) == k / group && scale_zero.size(1) == n, "int4pack_dequant: scale_zero shape");
  const uint8_t* src = packed.data_ptr<uint8_t>();
  const at::BFloat16* sz = scale_zero.data_ptr<at::BFloat16>();
  at::Tensor out = at::empty({n, k}, scale_zero.options());
  at::BFloat16* dst = out.data_ptr<at::BFloat16>();
  const int64_t groups = k / group;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scale(groups), offset(groups);
    for (int64_t row = begin; row < end; ++row) {
      const uint8_t* bytes = src + (row / 64) * 64 * k / 2 + row % 32;  // byte i of this row: bytes[i * 32]
      const int shift = (row % 64) < 32 ? 0 : 4;
      for (int64_t g = 0; g < groups; ++g) {
        const at::BFloat16* pair = sz + (g * n + row) * 2;
        scale[g] = static_cast<float>(pair[0]);
        offset[g] = static_cast<float>(pair[1]) - 8.f * scale[g];
      }
      at::BFloat16* out_row = dst + row * k;
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t i = g * group; i < (g + 1) * group; ++i)
          out_row[i] = static_cast<float>((bytes[i * 32] >> shift) & 0x0F) * scale[g] + offset[g];
    }
  });
  return out;
}

}  // namespace

// The operator namespace is `quept` unless the build names another (a second build of the portable path).
#ifndef QUEPT_OPS
#define QUEPT_OPS quept
#endif
#define QUEPT_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define QUEPT_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

QUEPT_LIBRARY(QUEPT_OPS, m) {
  m.def("planes_gemv(Tensor x, Tensor[] planes, int bits, Tensor scale, Tensor zero, int group) -> Tensor");
  m.def("planes_dequant(Tensor[] planes, int bits, Tensor scale, Tensor zero, int group, int in_features) -> Tensor");
  m.def("int4pack_dequant(Tensor packed, Tensor scale_zero, int group) -> Tensor");
}

QUEPT_LIBRARY_IMPL(QUEPT_OPS, CPU, m) {
  m.impl("planes_gemv", &planes_gemv);
  m.impl("planes_dequant", &planes_dequant);
  m.impl("int4pack_dequant", &int4pack_dequant);
}
