// Matrix-vector products over bit-plane weights in tiles (see kernels/formats.py, pack_planes).
//
// Layout. Output rows come in tiles of 16, inputs in chunks of 64. Per (tile, chunk) the kernel
// multiplies 16 registers C_t (t = 0..15): byte 4r + j of C_t is the code of the tile's row r at the
// chunk's input 4t + j, so one vpdpbusd takes inputs 4t..4t+3 of all 16 rows into their int32 lanes.
// A b-bit code is split into planes of width 4, 2 or 1 (lowest bits first; 8 bits is one plane of
// bytes). A width-w plane holds 2w vectors of 64 bytes per (tile, chunk): byte u of vector v holds byte
// u of C_t for t = v * (8 / w) + s at shift w * s. Unpacking a register is a load and, per plane, one
// mask or one gf2p8affine bit move, done once per (tile, chunk) for up to 8 activation rows.
//
//   y[m, n] = sum_g scale[n, g] * (sum_{k in g} code[n, k] * x[m, k]  -  zero[n, g] * sum_{k in g} x[m, k])
//
// Scales are float16 and zero-points uint8, [tiles][groups][16]: the grid's own precision (quant/grid.py).
//
// With AVX-512 VNNI, the activations are quantized to int8 per chunk of 64 (a float scale each, as
// llama.cpp's Q8 blocks): a chunk is 16 vpdpbusd per tile and row, then one conversion to float. Every
// (row, tile) runs the same instructions whichever rows and tiles are computed beside it, so a row's
// output does not depend on its neighbours. The dense bf16 weights for prefill come from AVX-512 BF16
// conversions. Other CPUs use portable float loops. The ops (planes.cpp) and the whole decode step
// (decode.cpp) share these kernels.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__) && \
    defined(__AVX512VBMI__) && defined(__GFNI__) && \
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

constexpr int kTile = 16;  // output rows per tile (bit planes and lookup-table planes)

// One packed weight [n, k] as the kernels read it.
struct Problem {
  int64_t bits = 0;
  const uint8_t* planes[3] = {nullptr, nullptr, nullptr};
  int64_t record[3] = {0, 0, 0};  // bytes of each plane per (tile, chunk): 128 * width
  const c10::Half* scale = nullptr;  // [tiles][groups][16]
  const uint8_t* zero = nullptr;     // [tiles][groups][16]
  int64_t k = 0, n = 0, tiles = 0, groups = 0, group = 0, chunks_per_group = 0, chunks = 0;  // the last group may be cut short
  const uint8_t* chunk(int plane, int64_t tile, int64_t c) const {
    return planes[plane] + (tile * chunks + c) * record[plane];
  }
  int64_t at(int64_t tile, int64_t g) const { return (tile * groups + g) * kTile; }  // scale, zero of row 0
};

inline Problem make_problem(at::TensorList planes, int64_t bits, int64_t k, const at::Tensor& scale,
                            const at::Tensor& zero, int64_t group) {
  const auto widths = plane_widths(bits);
  TORCH_CHECK(planes.size() == widths.size(), "planes: expected ", widths.size(), " planes");
  TORCH_CHECK(k % kChunk == 0 && group % kChunk == 0, "planes: in_features and group must be multiples of 64");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && zero.scalar_type() == at::kByte, "planes: scale f16, zero u8");
  TORCH_CHECK(scale.is_contiguous() && zero.is_contiguous() && scale.dim() == 3 && scale.sizes() == zero.sizes() &&
                  scale.size(2) == kTile,
              "planes: scale and zero must be contiguous [tiles, groups, 16]");
  Problem p;
  p.bits = bits;
  p.tiles = scale.size(0);
  const int64_t n = p.tiles * kTile;
  for (size_t i = 0; i < widths.size(); ++i) {
    TORCH_CHECK(planes[i].is_contiguous() && planes[i].scalar_type() == at::kByte, "planes: planes must be uint8");
    TORCH_CHECK(planes[i].numel() == n * k * widths[i] / 8, "planes: plane ", i, " has the wrong size");
    p.planes[i] = planes[i].data_ptr<uint8_t>();
    p.record[i] = 128 * widths[i];
  }
  p.scale = scale.data_ptr<c10::Half>();
  p.zero = zero.data_ptr<uint8_t>();
  p.k = k;
  p.n = n;
  p.group = group;
  p.groups = (k + group - 1) / group;
  p.chunks_per_group = group / kChunk;
  p.chunks = k / kChunk;
  TORCH_CHECK(scale.size(1) == p.groups, "planes: expected ", p.groups, " groups");
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
  const int64_t tile = row / kTile, r = row % kTile;
  int low = 0;
  int plane = 0;
  for (int width : plane_widths(p.bits)) {
    const uint8_t* record = p.chunk(plane, tile, c);
    const int per_vector = 8 / width, mask = (1 << width) - 1;
    for (int e = 0; e < kChunk; ++e) {
      const int t = e / 4, u = 4 * static_cast<int>(r) + e % 4;
      const int byte = record[(t / per_vector) * 64 + u];
      out[e] |= static_cast<uint8_t>(((byte >> (width * (t % per_vector))) & mask) << low);
    }
    low += width;
    ++plane;
  }
}

// Row `row` of the dequantized weight, (code - zero) * scale, as float32 [k].
inline void dequant_row(const Problem& p, int64_t row, float* out) {
  alignas(64) uint8_t codes[kChunk];
  for (int64_t c = 0; c < p.chunks; ++c) {
    unpack_chunk(p, row, c, codes);
    const int64_t at = p.at(row / kTile, c / p.chunks_per_group) + row % kTile;
    const float s = static_cast<float>(p.scale[at]), z = static_cast<float>(p.zero[at]);
    for (int j = 0; j < kChunk; ++j) out[c * kChunk + j] = (static_cast<float>(codes[j]) - z) * s;
  }
}

// ---------------------------------------------------------------------------------------------
// Portable path.

#ifndef QUEPT_AVX512

// y[m, 16 tile + r] (row stride ldy) for tiles [begin, end); each chunk is unpacked once for every row.
inline void gemv_tiles(const Problem& p, const Activations& a, float* y, int64_t ldy, int64_t begin, int64_t end) {
  alignas(64) uint8_t codes[kChunk];
  std::vector<float> total(a.rows), acc(a.rows);
  for (int64_t row = begin * kTile; row < end * kTile; ++row) {
    std::fill(total.begin(), total.end(), 0.f);
    for (int64_t g = 0; g < p.groups; ++g) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c = g * p.chunks_per_group; c < std::min((g + 1) * p.chunks_per_group, p.chunks); ++c) {
        unpack_chunk(p, row, c, codes);
        for (int64_t m = 0; m < a.rows; ++m) {
          const float* xc = a.f + m * p.k + c * kChunk;
          for (int j = 0; j < kChunk; ++j) acc[m] += static_cast<float>(codes[j]) * xc[j];
        }
      }
      const int64_t at = p.at(row / kTile, g) + row % kTile;
      for (int64_t m = 0; m < a.rows; ++m)
        total[m] += static_cast<float>(p.scale[at]) *
                    (acc[m] - static_cast<float>(p.zero[at]) * a.sums[m * p.groups + g]);
    }
    for (int64_t m = 0; m < a.rows; ++m) y[m * ldy + row] = total[m];
  }
}

// The dense bf16 weight, tiles [begin, end).
inline void dequant_tiles_bf16(const Problem& p, at::BFloat16* out, int64_t begin, int64_t end) {
  std::vector<float> row_values(p.k);
  for (int64_t row = begin * kTile; row < end * kTile; ++row) {
    dequant_row(p, row, row_values.data());
    for (int64_t i = 0; i < p.k; ++i) out[row * p.k + i] = row_values[i];
  }
}

#endif

// ---------------------------------------------------------------------------------------------
// AVX-512 path.

#ifdef QUEPT_AVX512

// The 16 scales (float16) and zero-points (uint8) of one (tile, group) as floats.
inline __m512 load_scales(const c10::Half* scale) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale)));
}
inline __m512 load_zeros(const uint8_t* zero) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zero))));
}

// The gf2p8affine matrix that moves `width` bits of every byte from bit `from` to bit `to`, clearing the
// others: output bit i takes the input bits selected by byte 7 - i of the matrix.
constexpr uint64_t move_bits(int from, int to, int width) {
  uint64_t matrix = 0;
  for (int e = 0; e < width; ++e) matrix |= uint64_t{1} << (8 * (7 - (to + e)) + from + e);
  return matrix;
}

// Adds a width-W plane (its bits at LOW and up) of C_t to `into` (ignored when FIRST): one masking or
// one bit move (gf2p8affine, shift and mask in one instruction), then an OR.
template <int W, int LOW, bool FIRST>
inline __m512i add_plane(const uint8_t* record, int t, __m512i into) {
  constexpr int per_vector = 8 / W;
  const __m512i raw = _mm512_loadu_si512(record + (t / per_vector) * 64);
  const int from = W * (t % per_vector);
  const __m512i bits = from == LOW ? _mm512_and_si512(raw, _mm512_set1_epi8(static_cast<char>(((1 << W) - 1) << LOW)))
                                   : _mm512_gf2p8affine_epi64_epi8(raw, _mm512_set1_epi64(static_cast<int64_t>(
                                                                             move_bits(from, LOW, W))), 0);
  if constexpr (FIRST) return bits;
  return _mm512_or_si512(into, bits);
}

// C_t of one (tile, chunk): records[i] is plane i's record.
template <int BITS>
inline __m512i tile_codes(const uint8_t* const* records, int t) {
  const __m512i none = _mm512_setzero_si512();
  if constexpr (BITS == 8) return _mm512_loadu_si512(records[0] + t * 64);
  if constexpr (BITS == 2) return add_plane<2, 0, true>(records[0], t, none);
  if constexpr (BITS == 3) return add_plane<1, 2, false>(records[1], t, add_plane<2, 0, true>(records[0], t, none));
  if constexpr (BITS == 4) return add_plane<4, 0, true>(records[0], t, none);
  if constexpr (BITS == 5) return add_plane<1, 4, false>(records[1], t, add_plane<4, 0, true>(records[0], t, none));
  if constexpr (BITS == 6) return add_plane<2, 4, false>(records[1], t, add_plane<4, 0, true>(records[0], t, none));
  if constexpr (BITS == 7)
    return add_plane<1, 6, false>(records[2], t,
                                  add_plane<2, 4, false>(records[1], t, add_plane<4, 0, true>(records[0], t, none)));
  return none;
}

constexpr int planes_of(int bits) { return bits == 7 ? 3 : (bits == 3 || bits == 5 || bits == 6) ? 2 : 1; }

// Two or three planes are as many streams through memory, advancing at different rates, and the hardware
// prefetcher keeps too few of their lines in flight: on the 2-core Zen 4 machine, w3 and w5-w7 read the
// head at two thirds of the bandwidth w4 and w8 reach (one stream). So their kernels fetch each plane's
// record this many bytes of weight ahead; one-plane widths are left to the hardware (a software prefetch
// slowed w8 there).
constexpr int64_t kPrefetchBytes = 4096;

template <int BITS>
inline void prefetch_ahead(const Problem& p, const uint8_t* const* records) {
  constexpr int P = planes_of(BITS);
  constexpr int64_t records_ahead = (kPrefetchBytes + 128 * BITS - 1) / (128 * BITS);
  if constexpr (P > 1)
    for (int i = 0; i < P; ++i) {
      const char* ahead = reinterpret_cast<const char*>(records[i] + records_ahead * p.record[i]);
      for (int64_t line = 0; line < p.record[i]; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    }
}

// One tile, R activation rows from m0: y[m0 + m, 16 tile ...]. Each row sums its chunk's 16 products in A
// int32 accumulators (short dependency chains where few rows share the unpacked codes); integer sums
// are exact, so the result does not depend on A.
template <int BITS, int R, int A>
void tiled_rows(const Problem& p, const Activations& a, int64_t m0, float* y, int64_t ldy, int64_t tile) {
  constexpr int P = planes_of(BITS);
  __m512 total[R];
  for (int m = 0; m < R; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    const __m512 scale = load_scales(p.scale + p.at(tile, g));
    const int64_t last = std::min((g + 1) * p.chunks_per_group, p.chunks);
    for (int64_t c = g * p.chunks_per_group; c < last; ++c) {
      const uint8_t* records[3];
      for (int i = 0; i < P; ++i) records[i] = p.chunk(i, tile, c);
      prefetch_ahead<BITS>(p, records);
      __m512i acc[R][A];
      for (int m = 0; m < R; ++m)
        for (int i = 0; i < A; ++i) acc[m][i] = _mm512_setzero_si512();
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) {
        const __m512i codes = tile_codes<BITS>(records, t);
        for (int m = 0; m < R; ++m) {
          int32_t four;
          std::memcpy(&four, a.q + (m0 + m) * p.k + c * kChunk + 4 * t, sizeof(four));
          acc[m][t % A] = _mm512_dpbusd_epi32(acc[m][t % A], codes, _mm512_set1_epi32(four));
        }
      }
      for (int m = 0; m < R; ++m) {
        __m512i sum = acc[m][0];
        for (int i = 1; i < A; ++i) sum = _mm512_add_epi32(sum, acc[m][i]);
        const __m512 step = _mm512_set1_ps(a.scale[(m0 + m) * p.chunks + c]);
        total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(scale, step), total[m]);
      }
    }
    const __m512 zero_scale = _mm512_mul_ps(load_zeros(p.zero + p.at(tile, g)), scale);
    for (int m = 0; m < R; ++m)
      total[m] = _mm512_fnmadd_ps(zero_scale, _mm512_set1_ps(a.sums[(m0 + m) * p.groups + g]), total[m]);
  }
  for (int m = 0; m < R; ++m) _mm512_storeu_ps(y + (m0 + m) * ldy + tile * kTile, total[m]);
}

// Tile by tile (each tile's planes stream from memory once), every row: up to 8 rows share one unpacking.
template <int BITS>
void tiled_gemv(const Problem& p, const Activations& a, float* y, int64_t ldy, int64_t begin, int64_t end) {
  for (int64_t tile = begin; tile < end; ++tile) {
    int64_t m0 = 0;
    for (; m0 + 8 <= a.rows; m0 += 8) tiled_rows<BITS, 8, 1>(p, a, m0, y, ldy, tile);
    for (; m0 + 4 <= a.rows; m0 += 4) tiled_rows<BITS, 4, 1>(p, a, m0, y, ldy, tile);
    for (; m0 + 2 <= a.rows; m0 += 2) tiled_rows<BITS, 2, 2>(p, a, m0, y, ldy, tile);
    for (; m0 < a.rows; ++m0) tiled_rows<BITS, 1, 4>(p, a, m0, y, ldy, tile);
  }
}

// y[m, 16 tile + r] (row stride ldy) for tiles [begin, end).
inline void gemv_tiles(const Problem& p, const Activations& a, float* y, int64_t ldy, int64_t begin, int64_t end) {
  with_bits(p.bits, [&](auto b) { tiled_gemv<decltype(b)::value>(p, a, y, ldy, begin, end); });
}

// Transposes 16 x 16 dwords in registers: rows[t] lane r becomes rows[r] lane t (64 shuffles).
inline void transpose16(__m512i* rows) {
  __m512i a[16], b[16], c[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // b[i + j] lane L: rows i..i+3 at column 4L + j
    b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
    b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
    b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
    b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // rows 0-7 (c[2j], c[2j + 1]) and 8-15 (c[8 + 2j], c[9 + 2j]) of columns j, j + 4, ...
    c[2 * j] = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88);
    c[2 * j + 1] = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);
    c[8 + 2 * j] = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88);
    c[9 + 2 * j] = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {
    rows[j] = _mm512_shuffle_i32x4(c[2 * j], c[8 + 2 * j], 0x88);
    rows[j + 8] = _mm512_shuffle_i32x4(c[2 * j], c[8 + 2 * j], 0xDD);
    rows[j + 4] = _mm512_shuffle_i32x4(c[2 * j + 1], c[9 + 2 * j], 0x88);
    rows[j + 12] = _mm512_shuffle_i32x4(c[2 * j + 1], c[9 + 2 * j], 0xDD);
  }
}

template <int BITS>
void tiled_dequant(const Problem& p, uint16_t* out, int64_t begin, int64_t end) {
  constexpr int P = planes_of(BITS);
  for (int64_t tile = begin; tile < end; ++tile)
    for (int64_t c = 0; c < p.chunks; ++c) {
      const uint8_t* records[3];
      for (int i = 0; i < P; ++i) records[i] = p.chunk(i, tile, c);
      prefetch_ahead<BITS>(p, records);
      __m512i codes[16];  // C_t, then (transposed) row r's 64 codes of the chunk
      for (int t = 0; t < 16; ++t) codes[t] = tile_codes<BITS>(records, t);
      transpose16(codes);
      const int64_t at = p.at(tile, c / p.chunks_per_group);
      for (int r = 0; r < kTile; ++r) {
        const __m512 s = _mm512_set1_ps(static_cast<float>(p.scale[at + r]));
        const __m512 z = _mm512_set1_ps(static_cast<float>(p.zero[at + r]));
        __m512 f[4];
        for (int i = 0; i < 4; ++i) {
          const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes[r], i)));
          f[i] = _mm512_mul_ps(_mm512_sub_ps(q, z), s);
        }
        uint16_t* dst = out + (tile * kTile + r) * p.k + c * kChunk;
        _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]));
        _mm512_storeu_si512(dst + 32, (__m512i)_mm512_cvtne2ps_pbh(f[3], f[2]));
      }
    }
}

// The dense bf16 weight, tiles [begin, end).
inline void dequant_tiles_bf16(const Problem& p, at::BFloat16* out_bf16, int64_t begin, int64_t end) {
  uint16_t* out = reinterpret_cast<uint16_t*>(out_bf16);
  with_bits(p.bits, [&](auto b) { tiled_dequant<decltype(b)::value>(p, out, begin, end); });
}

#endif

}  // namespace quept
