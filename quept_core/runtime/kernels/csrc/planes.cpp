// The CPU ops over bit-plane weights (planes_gemv, planes_dequant), bit-serial lookup-table weights
// (lut_gemv, lut_dequant; AVX-512 VBMI and VNNI only), dense bf16 weights (dense_gemv, AVX-512
// only) and PyTorch's int4 layout (int4pack_dequant). The kernels are in planes.h, lut.h and dense.h.

#include "dense.h"
#include "lut.h"
#include "planes.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace {

using quept::Activations;
using quept::Problem;

at::Tensor planes_gemv(const at::Tensor& x, at::TensorList planes, int64_t bits, const at::Tensor& scale,
                       const at::Tensor& zero, int64_t group) {
  TORCH_CHECK(x.dim() == 2, "planes_gemv: x must be [rows, in_features]");
  const int64_t rows = x.size(0), k = x.size(1);
  const Problem p = quept::make_problem(planes, bits, k, scale, zero, group);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor q = at::empty({rows, k}, xf.options().dtype(at::kChar));
  at::Tensor step = at::empty({rows, p.chunks}, xf.options());
  at::Tensor sums = at::empty({rows, p.groups}, xf.options());
  quept::prepare_activations(xf.data_ptr<float>(), rows, k, group, q.data_ptr<int8_t>(), step.data_ptr<float>(),
                             sums.data_ptr<float>());
  const Activations a{xf.data_ptr<float>(), q.data_ptr<int8_t>(), step.data_ptr<float>(), sums.data_ptr<float>(), rows};
  at::Tensor out = at::empty({rows, p.n}, xf.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, p.tiles, 1, [&](int64_t begin, int64_t end) { quept::gemv_tiles(p, a, op, p.n, begin, end); });
  return out.to(x.scalar_type());
}

// The dense bf16 weight [n, in_features]: (code - zero) * scale.
at::Tensor planes_dequant(at::TensorList planes, int64_t bits, const at::Tensor& scale, const at::Tensor& zero,
                          int64_t group, int64_t in_features) {
  const Problem p = quept::make_problem(planes, bits, in_features, scale, zero, group);
  at::Tensor out = at::empty({p.n, in_features}, scale.options().dtype(at::kBFloat16));
  at::parallel_for(0, p.tiles, 1, [&](int64_t begin, int64_t end) {
    quept::dequant_tiles_bf16(p, out.data_ptr<at::BFloat16>(), begin, end);
  });
  return out;
}

#ifdef QUEPT_AVX512

at::Tensor lut_gemv(const at::Tensor& x, const at::Tensor& planes, int64_t bits, const at::Tensor& scale,
                    const at::Tensor& zero, int64_t group) {
  TORCH_CHECK(x.dim() == 2, "lut_gemv: x must be [rows, in_features]");
  const int64_t rows = x.size(0), k = x.size(1);
  const quept::LutProblem p = quept::make_lut_problem(planes, bits, scale, zero, group, k);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor tables = at::empty({rows, p.blocks * 64}, xf.options().dtype(at::kChar));
  at::Tensor weights = at::empty({rows, p.blocks * 8}, xf.options().dtype(at::kInt));
  at::Tensor unit = at::empty({rows, p.groups}, xf.options());
  at::Tensor sums = at::empty({rows, p.groups}, xf.options());
  quept::prepare_lut(xf.data_ptr<float>(), rows, k, group, bits, tables.data_ptr<int8_t>(), weights.data_ptr<int32_t>(),
                     unit.data_ptr<float>(), sums.data_ptr<float>());
  const quept::LutActivations a{tables.data_ptr<int8_t>(), weights.data_ptr<int32_t>(), unit.data_ptr<float>(),
                                sums.data_ptr<float>(), rows};
  at::Tensor out = at::empty({rows, p.n}, xf.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, p.tiles, 1, [&](int64_t begin, int64_t end) { quept::lut_gemv_tiles(p, a, op, p.n, begin, end); });
  return out.to(x.scalar_type());
}

at::Tensor lut_dequant(const at::Tensor& planes, int64_t bits, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t group, int64_t in_features) {
  const quept::LutProblem p = quept::make_lut_problem(planes, bits, scale, zero, group, in_features);
  at::Tensor out = at::empty({p.n, in_features}, scale.options().dtype(at::kBFloat16));
  at::parallel_for(0, p.tiles, 1, [&](int64_t begin, int64_t end) {
    quept::lut_dequant_tiles(p, out.data_ptr<at::BFloat16>(), begin, end);
  });
  return out;
}

// x [rows, k] times a dense bf16 weight [n, k], as the fp plan's decode step runs it.
at::Tensor dense_gemv(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "dense_gemv: x [rows, in_features] and weight [out_features, in_features]");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(), "dense_gemv: a contiguous bf16 weight");
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor scratch = at::empty({rows, k}, weight.options());
  at::Tensor out = at::empty({rows, n}, xf.options());
  quept::dense_bf16_matmul(reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), n, k, xf.data_ptr<float>(),
                           rows, reinterpret_cast<uint16_t*>(scratch.data_ptr<at::BFloat16>()), out.data_ptr<float>(), n);
  return out;
}

#endif

bool has_lut() {
#ifdef QUEPT_AVX512
  return true;
#else
  return false;
#endif
}

// How many threads run an at::parallel_for of `items` items here: 1 whatever the thread count when
// the kernels were compiled without OpenMP (ATen's parallel loop is a header that falls back to a
// serial loop then).
int64_t parallel_threads(int64_t items) {
  std::vector<char> ran(static_cast<size_t>(at::get_num_threads()), 0);
  at::parallel_for(0, items, 1, [&](int64_t, int64_t) { ran[static_cast<size_t>(at::get_thread_num())] = 1; });
  return std::count(ran.begin(), ran.end(), 1);
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
  m.def("lut_gemv(Tensor x, Tensor planes, int bits, Tensor scale, Tensor zero, int group) -> Tensor");
  m.def("lut_dequant(Tensor planes, int bits, Tensor scale, Tensor zero, int group, int in_features) -> Tensor");
  m.def("dense_gemv(Tensor x, Tensor weight) -> Tensor");
  m.def("has_lut() -> bool", &has_lut);
  m.def("parallel_threads(int items) -> int", &parallel_threads);
}

QUEPT_LIBRARY_IMPL(QUEPT_OPS, CPU, m) {
  m.impl("planes_gemv", &planes_gemv);
  m.impl("planes_dequant", &planes_dequant);
  m.impl("int4pack_dequant", &int4pack_dequant);
#ifdef QUEPT_AVX512
  m.impl("lut_gemv", &lut_gemv);
  m.impl("lut_dequant", &lut_dequant);
  m.impl("dense_gemv", &dense_gemv);
#endif
}
