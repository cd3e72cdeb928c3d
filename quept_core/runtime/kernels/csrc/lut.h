// Matrix-vector products over bit-serial weights by table lookup (as in T-MAC), where each bit of a
// code costs the same: a b-bit weight costs b lookups, so fewer bits are faster even when the CPU,
// not memory, is the limit.
//
// Layout. Output rows come in tiles of 16, inputs in blocks of 16; block input s + 4t (s, t in 0..3)
// belongs to quad s at bit t. For each bit i of the codes, a (tile, block) record is 32 bytes holding
// 64 four-bit indices, one per (row r, quad s) at position p = 4r + s: byte u holds position u (low
// nibble) and u + 32 (high nibble). Index bit t is bit i of the code of row r at input s + 4t.
//
// Tables. For one activation row, quad s of block j has the 16 sums T[e] = sum_t bit_t(e) x[16j + s + 4t],
// quantized to int8 with a step of the group's step / 2^f (f in 0..8-b, as fine as the quad's own
// range allows). One vpermb looks up 64 (row, quad) sums from the four quads' tables of a block; one
// vpdpbusd weighs each by 2^(i + 8-b - f) (at most 128: it fits the instruction's unsigned byte) and
// adds each row's four quads into its int32 lane, in units of the group's step / 2^(8-b). Per group, the 16 rows' sums become floats with the rows' scales, less zero * scale *
// sum(x) (exact: taking it from the quantized tables adds their rounding instead of cancelling it).
//
//   y[n] = sum_g scale[n, g] * (unit_g * sum_{i, quads} 2^(i + 8-b - f) T~[index]  -  zero[n, g] * sum_{k in g} x[k])

#pragma once

#include "planes.h"

namespace quept {

constexpr int kBlock = 16;  // inputs per block (four quads)

struct LutProblem {
  int64_t bits = 0, n = 0, k = 0, group = 0, groups = 0, blocks = 0, blocks_per_group = 0, tiles = 0;
  const uint8_t* planes = nullptr;  // [bits][tiles][blocks][32]
  const c10::Half* scale = nullptr;  // [tiles][groups][16]
  const uint8_t* zero = nullptr;     // [tiles][groups][16]
  const uint8_t* record(int64_t bit, int64_t tile, int64_t block) const {
    return planes + ((bit * tiles + tile) * blocks + block) * 32;
  }
};

inline LutProblem make_lut_problem(const at::Tensor& planes, int64_t bits, const at::Tensor& scale,
                                   const at::Tensor& zero, int64_t group, int64_t k) {
  TORCH_CHECK(2 <= bits && bits <= 8, "lut: bits must be in 2..8, got ", bits);
  TORCH_CHECK(k % 64 == 0 && group % 64 == 0, "lut: in_features and group must be multiples of 64");
  TORCH_CHECK(planes.scalar_type() == at::kByte && planes.is_contiguous(), "lut: planes must be contiguous uint8");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && zero.scalar_type() == at::kByte && scale.is_contiguous() &&
                  zero.is_contiguous() && scale.dim() == 3 && scale.sizes() == zero.sizes(),
              "lut: scale (float16) and zero (uint8) must be contiguous [tiles, groups, 16]");
  LutProblem p;
  p.bits = bits;
  p.k = k;
  p.group = group;
  p.tiles = scale.size(0);
  p.n = p.tiles * kTile;
  p.groups = (k + group - 1) / group;
  p.blocks = k / kBlock;
  p.blocks_per_group = group / kBlock;
  TORCH_CHECK(scale.size(1) == p.groups && scale.size(2) == kTile, "lut: expected scale [", p.tiles, ", ", p.groups,
              ", 16]");
  TORCH_CHECK(planes.numel() == bits * p.n * k / 8, "lut: planes hold ", planes.numel(), " bytes, expected ",
              bits * p.n * k / 8);
  p.planes = planes.data_ptr<uint8_t>();
  p.scale = scale.data_ptr<c10::Half>();
  p.zero = zero.data_ptr<uint8_t>();
  return p;
}

// Row `row` of the dequantized weight, (code - zero) * scale, as float32 [k] (the tied embedding).
inline void lut_dequant_row(const LutProblem& p, int64_t row, float* out) {
  const int64_t tile = row / kTile, r = row % kTile;
  for (int64_t block = 0; block < p.blocks; ++block) {
    int codes[kBlock] = {0};
    for (int64_t bit = 0; bit < p.bits; ++bit) {
      const uint8_t* rec = p.record(bit, tile, block);
      for (int s = 0; s < 4; ++s) {
        const int position = 4 * static_cast<int>(r) + s;
        const int index = position < 32 ? rec[position] & 0x0F : rec[position - 32] >> 4;
        for (int t = 0; t < 4; ++t) codes[s + 4 * t] |= ((index >> t) & 1) << bit;
      }
    }
    const int64_t at = (tile * p.groups + block / p.blocks_per_group) * kTile + r;
    const float scale = static_cast<float>(p.scale[at]);
    for (int e = 0; e < kBlock; ++e) out[block * kBlock + e] = static_cast<float>(codes[e] - p.zero[at]) * scale;
  }
}

// Activation tables: [rows][blocks][64] int8 (quad s's 16 entries at 16s); per (row, block, bit i)
// the dpbusd weights (byte s: 2^(i + 8-b - f_s)); per (row, group) the accumulator's unit and sum(x).
struct LutActivations {
  const int8_t* tables = nullptr;
  const int32_t* weights = nullptr;  // [rows][blocks][8]
  const float* unit = nullptr;       // [rows][groups]
  const float* sums = nullptr;       // [rows][groups]
  int64_t rows = 0;
};

inline void prepare_lut(const float* x, int64_t rows, int64_t k, int64_t group, int64_t bits, int8_t* tables,
                        int32_t* weights, float* unit, float* sums) {
#ifdef QUEPT_AVX512
  const int64_t blocks = k / kBlock, groups = (k + group - 1) / group, per_group = group / kBlock;
  const int finest = 8 - static_cast<int>(bits);  // the largest exponent f that keeps every weight <= 128
  // Entry e of a quad's table holds x_t where bit t of e is set: four masked adds of 16 lanes.
  __m512 member[4];
  for (int t = 0; t < 4; ++t) {
    alignas(64) float mask[16];
    for (int e = 0; e < 16; ++e) mask[e] = static_cast<float>((e >> t) & 1);
    member[t] = _mm512_load_ps(mask);
  }
  // Per-thread scratch, grown once: this runs for every lookup-table matmul of every decode step.
  thread_local std::vector<float> raw, quad_top;
  raw.resize(blocks * 64);
  quad_top.resize(blocks * 4);
  for (int64_t m = 0; m < rows; ++m) {
    const float* xr = x + m * k;
    for (int64_t block = 0; block < blocks; ++block)
      for (int s = 0; s < 4; ++s) {
        __m512 entries = _mm512_setzero_ps();
        for (int t = 0; t < 4; ++t)
          entries = _mm512_fmadd_ps(_mm512_set1_ps(xr[block * kBlock + s + 4 * t]), member[t], entries);
        _mm512_storeu_ps(raw.data() + (block * 4 + s) * 16, entries);
        quad_top[block * 4 + s] = _mm512_reduce_max_ps(_mm512_abs_ps(entries));
      }
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = g * per_group, last = std::min(blocks, (g + 1) * per_group);
      float top = 0.f, full = 0.f;
      for (int64_t i = first * 4; i < last * 4; ++i) top = std::max(top, quad_top[i]);
      const float step = top / 127.f;
      for (int64_t block = first; block < last; ++block) {
        uint32_t pattern = 0;
        for (int s = 0; s < 4; ++s) {
          const int64_t quad = block * 4 + s;
          int f = 0;
          while (f < finest && quad_top[quad] * static_cast<float>(1 << (f + 1)) <= top) ++f;
          const float inverse = top > 0.f ? 127.f * static_cast<float>(1 << f) / top : 0.f;
          const __m512i rounded = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(raw.data() + quad * 16), _mm512_set1_ps(inverse)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(tables + (m * blocks + block) * 64 + 16 * s),
                           _mm512_cvtsepi32_epi8(rounded));
          pattern |= static_cast<uint32_t>(1u << (finest - f)) << (8 * s);
          for (int t = 0; t < 4; ++t) full += xr[block * kBlock + s + 4 * t];
        }
        for (int i = 0; i < 8; ++i)
          weights[(m * blocks + block) * 8 + i] = i < bits ? static_cast<int32_t>(pattern << i) : 0;
      }
      unit[m * groups + g] = step / static_cast<float>(1 << finest);
      sums[m * groups + g] = full;
    }
  }
#else
  TORCH_CHECK(false, "lookup-table kernels need AVX-512 VBMI and VNNI");
#endif
}

#ifdef QUEPT_AVX512

// The 64 indices of one record, each with its quad's table offset (16s) in bits 4-5.
inline __m512i lut_indices(const uint8_t* record) {
  const __m512i raw = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(record)));
  const __m512i nibbles = _mm512_srlv_epi64(raw, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0));
  const __m512i quad_offsets = _mm512_set1_epi32(0x30201000);
  return _mm512_ternarylogic_epi32(nibbles, _mm512_set1_epi8(0x0F), quad_offsets, 0xEA);  // (a & b) | c
}

// R activation rows at once over tiles [begin, end): y[m, 16 tile .. 16 tile + 15].
template <int BITS, int R>
void lut_rows(const LutProblem& p, const LutActivations& a, int64_t m0, float* y, int64_t ldy, int64_t begin,
              int64_t end) {
  for (int64_t tile = begin; tile < end; ++tile) {
    __m512 total[R];
    for (int m = 0; m < R; ++m) total[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < p.groups; ++g) {
      __m512i acc[R];
      for (int m = 0; m < R; ++m) acc[m] = _mm512_setzero_si512();
      const int64_t last = std::min(p.blocks, (g + 1) * p.blocks_per_group);
      for (int64_t block = g * p.blocks_per_group; block < last; ++block) {
        __m512i index[BITS];
        for (int i = 0; i < BITS; ++i) index[i] = lut_indices(p.record(i, tile, block));
        for (int m = 0; m < R; ++m) {
          const int64_t at = (m0 + m) * p.blocks + block;
          const __m512i table = _mm512_loadu_si512(a.tables + at * 64);
          for (int i = 0; i < BITS; ++i)
            acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_set1_epi32(a.weights[at * 8 + i]),
                                         _mm512_permutexvar_epi8(index[i], table));
        }
      }
      const int64_t at = (tile * p.groups + g) * kTile;
      const __m512 scale = load_scales(p.scale + at);
      const __m512 zero_scale = _mm512_mul_ps(load_zeros(p.zero + at), scale);
      for (int m = 0; m < R; ++m) {
        const int64_t ag = (m0 + m) * p.groups + g;
        total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_mul_ps(scale, _mm512_set1_ps(a.unit[ag])),
                                   total[m]);
        total[m] = _mm512_fnmadd_ps(zero_scale, _mm512_set1_ps(a.sums[ag]), total[m]);
      }
    }
    for (int m = 0; m < R; ++m) _mm512_storeu_ps(y + (m0 + m) * ldy + tile * kTile, total[m]);
  }
}

template <int BITS>
void lut_tile(const LutProblem& p, const LutActivations& a, float* y, int64_t ldy, int64_t begin, int64_t end) {
  int64_t m0 = 0;
  for (; m0 + 4 <= a.rows; m0 += 4) lut_rows<BITS, 4>(p, a, m0, y, ldy, begin, end);
  for (; m0 + 2 <= a.rows; m0 += 2) lut_rows<BITS, 2>(p, a, m0, y, ldy, begin, end);
  for (; m0 < a.rows; ++m0) lut_rows<BITS, 1>(p, a, m0, y, ldy, begin, end);
}

// y[m, 16 begin .. 16 end) (row stride ldy) for tiles [begin, end).
inline void lut_gemv_tiles(const LutProblem& p, const LutActivations& a, float* y, int64_t ldy, int64_t begin,
                           int64_t end) {
  with_bits(p.bits, [&](auto b) { lut_tile<decltype(b)::value>(p, a, y, ldy, begin, end); });
}

// The dense bf16 weight [n, k] for tiles [begin, end): per (tile, block) the 16 x 16 codes are
// rebuilt bit by bit, then transposed so that each row's 16 codes sit in one 128-bit lane.
inline void lut_dequant_tiles(const LutProblem& p, at::BFloat16* out_bf16, int64_t begin, int64_t end) {
  uint16_t* out = reinterpret_cast<uint16_t*>(out_bf16);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t tile = begin; tile < end; ++tile)
    for (int64_t block = 0; block < p.blocks; ++block) {
      __m512i codes[4];  // codes[t] byte 4r + s: the code of row r at input s + 4t
      for (int t = 0; t < 4; ++t) codes[t] = _mm512_setzero_si512();
      for (int64_t bit = 0; bit < p.bits; ++bit) {
        const __m512i raw = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
            p.record(bit, tile, block))));
        const __m512i nibbles = _mm512_and_si512(_mm512_srlv_epi64(raw, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0)), low4);
        const __m512i mask = _mm512_set1_epi8(static_cast<char>(1 << bit));
        for (int t = 0; t < 4; ++t) {
          const int shift = static_cast<int>(bit) - t;
          const __m512i moved = shift >= 0 ? _mm512_sll_epi16(nibbles, _mm_cvtsi32_si128(shift))
                                           : _mm512_srl_epi16(nibbles, _mm_cvtsi32_si128(-shift));
          codes[t] = _mm512_ternarylogic_epi32(moved, mask, codes[t], 0xEA);  // (a & b) | c
        }
      }
      // Per 128-bit lane L (rows 4L..4L+3): rows[j] lane L = row 4L + j's codes at inputs 0..15.
      const __m512i a01 = _mm512_unpacklo_epi32(codes[0], codes[1]), b01 = _mm512_unpackhi_epi32(codes[0], codes[1]);
      const __m512i a23 = _mm512_unpacklo_epi32(codes[2], codes[3]), b23 = _mm512_unpackhi_epi32(codes[2], codes[3]);
      const __m512i rows[4] = {_mm512_unpacklo_epi64(a01, a23), _mm512_unpackhi_epi64(a01, a23),
                               _mm512_unpacklo_epi64(b01, b23), _mm512_unpackhi_epi64(b01, b23)};
      const int64_t at = (tile * p.groups + block / p.blocks_per_group) * kTile;
      alignas(64) uint8_t lanes[64];
      for (int j = 0; j < 4; ++j) {
        _mm512_store_si512(lanes, rows[j]);
        for (int lane = 0; lane < 4; ++lane) {
          const int r = 4 * lane + j;
          const __m128i bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(lanes + 16 * lane));
          const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
          const __m512 w = _mm512_mul_ps(_mm512_sub_ps(q, _mm512_set1_ps(p.zero[at + r])),
                                         _mm512_set1_ps(static_cast<float>(p.scale[at + r])));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (tile * kTile + r) * p.k + block * kBlock),
                              (__m256i)_mm512_cvtneps_pbh(w));
        }
      }
    }
}

#endif

}  // namespace quept
