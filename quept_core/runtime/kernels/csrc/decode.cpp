// The whole decode step of a LLaMA model over packed weights, in one call: embedding, every block
// (RMSNorm, q|k|v, RoPE, the KV pool write, grouped-query attention, o, SwiGLU) and the output head,
// for every running sequence at once.
//
// A program is built once per layout (the packs serving each call site and the rows each serves, see
// runtime/model.py) and then run every step; a step allocates nothing but its logits. Every row is
// computed the same way whatever other rows share the step, so a sequence's logits do not depend on
// its neighbours.

#include "dense.h"
#include "lut.h"
#include "planes.h"

#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>

namespace {

// A weight the program multiplies by: bit planes, lookup-table planes, or a dense bf16 matrix (the fp
// plan, or an untied embedding).
struct Weight {
  quept::Problem planes;  // planes.bits == 0: not bit planes
  quept::LutProblem lut;  // lut.bits == 0: not lookup-table planes
  const at::BFloat16* bf16 = nullptr;
  int64_t n = 0, k = 0;
};

// Some rows of one call site, served by weights whose outputs sit side by side.
struct Part {
  std::vector<int64_t> rows;  // empty: every row, in order
  std::vector<int64_t> weights;
  std::vector<int64_t> offsets;  // first output column of each weight
};

enum Role { kQkv = 0, kO = 1, kGateUp = 2, kDown = 3, kRoles = 4 };

#ifdef QUEPT_AVX512
// The first min(count, 16) lanes.
inline __mmask16 tail_mask(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}

// e^x per lane (relative error about 2e-7): x = n ln 2 + r with |r| <= ln 2 / 2, a degree-6 polynomial for
// e^r, then scaling by 2^n. The same instructions for every lane, so a row's values never depend on
// where it sits in a vector.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

class DecodeProgram : public torch::CustomClassHolder {
 public:
  // dims: n_layers, hidden, ffn, n_heads, n_kv_heads, head_dim, vocab, max_rows.
  // norms: the attention norms of every layer, then the MLP norms, then the final norm (float32).
  // inv_freq [head_dim / 2] and rope_scaling: RoPE's inverse frequencies and attention scaling (float32).
  DecodeProgram(std::vector<int64_t> dims, double eps, std::vector<at::Tensor> norms, at::Tensor inv_freq,
                double rope_scaling)
      : layers_(dims.at(0)), hidden_(dims.at(1)), ffn_(dims.at(2)), heads_(dims.at(3)), kv_heads_(dims.at(4)),
        head_dim_(dims.at(5)), vocab_(dims.at(6)), max_rows_(dims.at(7)), eps_(static_cast<float>(eps)),
        norms_(std::move(norms)), inv_freq_(inv_freq.contiguous()), rope_scaling_(static_cast<float>(rope_scaling)),
        sites_(layers_ * kRoles + 1) {
    TORCH_CHECK(static_cast<int64_t>(norms_.size()) == 2 * layers_ + 1, "DecodeProgram: expected ", 2 * layers_ + 1,
                " norms");
    for (const auto& t : norms_) TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "norms: float32");
    TORCH_CHECK(head_dim_ % 2 == 0 && heads_ % kv_heads_ == 0, "DecodeProgram: bad head layout");
    TORCH_CHECK(inv_freq_.scalar_type() == at::kFloat && inv_freq_.numel() == head_dim_ / 2, "inv_freq: float32 [",
                head_dim_ / 2, "]");
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    const int64_t qkv = (heads_ + 2 * kv_heads_) * head_dim_, widest = std::max({qkv, 2 * ffn_, vocab_, hidden_});
    const int64_t deepest = std::max({hidden_, ffn_, heads_ * head_dim_});
    x_ = at::empty({max_rows_, hidden_}, f32);
    h_ = at::empty({max_rows_, hidden_}, f32);
    qkv_ = at::empty({max_rows_, qkv}, f32);
    attn_ = at::empty({max_rows_, heads_ * head_dim_}, f32);
    gate_up_ = at::empty({max_rows_, 2 * ffn_}, f32);
    act_ = at::empty({max_rows_, ffn_}, f32);
    delta_ = at::empty({max_rows_, hidden_}, f32);
    gathered_in_ = at::empty({max_rows_, deepest}, f32);
    gathered_out_ = at::empty({max_rows_, widest}, f32);
    // int8 activations [rows, k], or lookup tables [rows, k / 16, 64]
    quantized_ = at::empty({max_rows_, 4 * deepest}, at::TensorOptions().dtype(at::kChar));
    steps_ = at::empty({max_rows_, deepest / quept::kChunk}, f32);
    lut_weights_ = at::empty({max_rows_, deepest / quept::kBlock * 8}, at::TensorOptions().dtype(at::kInt));
    sums_ = at::empty({max_rows_, deepest / quept::kChunk}, f32);
    bf16_in_ = at::empty({max_rows_, deepest}, at::TensorOptions().dtype(at::kBFloat16));
    rope_cos_ = at::empty({max_rows_, head_dim_ / 2}, f32);
    rope_sin_ = at::empty({max_rows_, head_dim_ / 2}, f32);
    scores_ = at::empty({0}, f32);
  }

  int64_t add_planes(std::vector<at::Tensor> planes, int64_t bits, at::Tensor scale, at::Tensor zero, int64_t group,
                     int64_t in_features) {
    Weight w;
    w.planes = quept::make_problem(planes, bits, in_features, scale, zero, group);
    w.n = w.planes.n;
    w.k = in_features;
    for (auto& t : planes) keep_.push_back(t);
    keep_.push_back(scale);
    keep_.push_back(zero);
    weights_.push_back(w);
    return static_cast<int64_t>(weights_.size()) - 1;
  }

  int64_t add_lut(at::Tensor planes, int64_t bits, at::Tensor scale, at::Tensor zero, int64_t group,
                  int64_t in_features) {
#ifdef QUEPT_AVX512
    Weight w;
    w.lut = quept::make_lut_problem(planes, bits, scale, zero, group, in_features);
    w.n = w.lut.n;
    w.k = in_features;
    keep_.insert(keep_.end(), {planes, scale, zero});
    weights_.push_back(w);
    return static_cast<int64_t>(weights_.size()) - 1;
#else
    TORCH_CHECK(false, "add_lut: lookup-table kernels need AVX-512 VBMI and VNNI");
#endif
  }

  int64_t add_dense(at::Tensor weight) {
    TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "add_dense: a contiguous [out, in] weight");
    Weight w;
    w.n = weight.size(0);
    w.k = weight.size(1);
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "add_dense: a bf16 weight");
    w.bf16 = weight.data_ptr<at::BFloat16>();
    keep_.push_back(weight);
    weights_.push_back(w);
    return static_cast<int64_t>(weights_.size()) - 1;
  }

  // site: layer * 4 + role (q|k|v, o, gate|up, down), or n_layers * 4 for the output head.
  void add_part(int64_t site, std::vector<int64_t> rows, std::vector<int64_t> weights, std::vector<int64_t> offsets) {
    TORCH_CHECK(0 <= site && site < static_cast<int64_t>(sites_.size()), "add_part: no site ", site);
    TORCH_CHECK(weights.size() == offsets.size() && !weights.empty(), "add_part: one offset per weight");
    for (int64_t w : weights) TORCH_CHECK(0 <= w && w < static_cast<int64_t>(weights_.size()), "add_part: no weight ", w);
    sites_[site].push_back(Part{std::move(rows), std::move(weights), std::move(offsets)});
  }

  // Forget every site's parts and the embedding's; the weights stay, for a new layout over them.
  void clear_parts() {
    for (auto& parts : sites_) parts.clear();
    embedding_.clear();
  }

  // The embedding rows of `rows` (empty: every row) are rows of this weight [vocab, hidden].
  void add_embedding(std::vector<int64_t> rows, int64_t weight) {
    TORCH_CHECK(0 <= weight && weight < static_cast<int64_t>(weights_.size()), "add_embedding: no weight ", weight);
    embedding_.push_back(Part{std::move(rows), {weight}, {0}});
  }

  // One token for each row; keys and values are written to, and read from, the pools
  // [layers, slots, kv_heads, max_len, head_dim] (bf16: attention over a long context is bound by
  // reading them). Returns float32 logits [rows, vocab].
  at::Tensor forward(std::vector<int64_t> tokens, std::vector<int64_t> positions, std::vector<int64_t> slots,
                     at::Tensor k_pool, at::Tensor v_pool) {
    const int64_t rows = static_cast<int64_t>(tokens.size());
    TORCH_CHECK(0 < rows && rows <= max_rows_, "forward: 1..", max_rows_, " rows, got ", rows);
    TORCH_CHECK(positions.size() == tokens.size() && slots.size() == tokens.size(), "forward: one position and slot per row");
    TORCH_CHECK(k_pool.scalar_type() == at::kBFloat16 && v_pool.scalar_type() == at::kBFloat16 &&
                    k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.sizes() == v_pool.sizes() &&
                    k_pool.dim() == 5,
                "forward: bf16 contiguous pools [layers, slots, kv_heads, max_len, head_dim]");
    const int64_t max_len = k_pool.size(3);
    for (int64_t m = 0; m < rows; ++m) {
      TORCH_CHECK(0 <= tokens[m] && tokens[m] < vocab_, "forward: token ", tokens[m], " outside the vocabulary");
      TORCH_CHECK(0 <= positions[m] && positions[m] < max_len, "forward: position ", positions[m], " outside the pool");
      TORCH_CHECK(0 <= slots[m] && slots[m] < k_pool.size(1), "forward: no KV slot ", slots[m]);
    }
    if (scores_.numel() < rows * heads_ * max_len) scores_ = at::empty({rows * heads_ * max_len}, x_.options());

    float* x = x_.data_ptr<float>();
    embed(tokens, rows, x);
    rope_angles(positions, rows);
    float* h = h_.data_ptr<float>();
    for (int64_t layer = 0; layer < layers_; ++layer) {
      rms_norm(x, norms_[layer].data_ptr<float>(), rows, h);
      run_site(layer * kRoles + kQkv, h, rows, hidden_, qkv_.data_ptr<float>(), qkv_.size(1));
      rope(rows);
      attend(layer, positions, slots, rows, k_pool, v_pool);
      run_site(layer * kRoles + kO, attn_.data_ptr<float>(), rows, heads_ * head_dim_, delta_.data_ptr<float>(), hidden_);
      add_into(x, delta_.data_ptr<float>(), rows * hidden_);
      rms_norm(x, norms_[layers_ + layer].data_ptr<float>(), rows, h);
      run_site(layer * kRoles + kGateUp, h, rows, hidden_, gate_up_.data_ptr<float>(), 2 * ffn_);
      swiglu(rows);
      run_site(layer * kRoles + kDown, act_.data_ptr<float>(), rows, ffn_, delta_.data_ptr<float>(), hidden_);
      add_into(x, delta_.data_ptr<float>(), rows * hidden_);
    }
    rms_norm(x, norms_[2 * layers_].data_ptr<float>(), rows, h);
    at::Tensor logits = at::empty({rows, vocab_}, x_.options());
    run_site(layers_ * kRoles, h, rows, hidden_, logits.data_ptr<float>(), vocab_);
    return logits;
  }

  int64_t weight_count() const { return static_cast<int64_t>(weights_.size()); }

 private:
  void embed(const std::vector<int64_t>& tokens, int64_t rows, float* x) const {
    TORCH_CHECK(!embedding_.empty(), "forward: the program has no embedding");
    for (const Part& part : embedding_) {
      const Weight& w = weights_[part.weights[0]];
      const int64_t count = part.rows.empty() ? rows : static_cast<int64_t>(part.rows.size());
      for (int64_t i = 0; i < count; ++i) {
        const int64_t m = part.rows.empty() ? i : part.rows[i];
        float* out = x + m * hidden_;
        const int64_t token = tokens[m];
        if (w.planes.bits) {
          quept::dequant_row(w.planes, token, out);
        } else if (w.lut.bits) {
          quept::lut_dequant_row(w.lut, token, out);
        } else {
          for (int64_t j = 0; j < hidden_; ++j) out[j] = static_cast<float>(w.bf16[token * hidden_ + j]);
        }
      }
    }
  }

  void rms_norm(const float* x, const float* weight, int64_t rows, float* out) const {
    for (int64_t m = 0; m < rows; ++m) {
      const float* xr = x + m * hidden_;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t j = 0; j < hidden_; ++j) squares += xr[j] * xr[j];
      const float inverse = 1.f / std::sqrt(squares / static_cast<float>(hidden_) + eps_);
      for (int64_t j = 0; j < hidden_; ++j) out[m * hidden_ + j] = xr[j] * inverse * weight[j];
    }
  }

  static void add_into(float* x, const float* delta, int64_t count) {
    for (int64_t i = 0; i < count; ++i) x[i] += delta[i];
  }

  // y = x W^T for x [rows, k] (row stride k) into y (row stride ldy), one weight.
  void multiply(const Weight& w, const float* x, int64_t rows, float* y, int64_t ldy) {
    if (w.planes.bits) {
      int8_t* q = quantized_.data_ptr<int8_t>();
      float* steps = steps_.data_ptr<float>();
      float* sums = sums_.data_ptr<float>();
      quept::prepare_activations(x, rows, w.k, w.planes.group, q, steps, sums);
      const quept::Activations a{x, q, steps, sums, rows};
      at::parallel_for(0, w.planes.tiles, 1, [&](int64_t begin, int64_t end) {
        quept::gemv_tiles(w.planes, a, y, ldy, begin, end);
      });
      return;
    }
#ifdef QUEPT_AVX512
    if (w.lut.bits) {
      int8_t* tables = quantized_.data_ptr<int8_t>();
      int32_t* weights = lut_weights_.data_ptr<int32_t>();
      float* unit = steps_.data_ptr<float>();
      float* sums = sums_.data_ptr<float>();
      quept::prepare_lut(x, rows, w.k, w.lut.group, w.lut.bits, tables, weights, unit, sums);
      const quept::LutActivations a{tables, weights, unit, sums, rows};
      at::parallel_for(0, w.lut.tiles, 1, [&](int64_t begin, int64_t end) {
        quept::lut_gemv_tiles(w.lut, a, y, ldy, begin, end);
      });
      return;
    }
    if (w.bf16) {
      quept::dense_bf16_matmul(reinterpret_cast<const uint16_t*>(w.bf16), w.n, w.k, x, rows,
                               reinterpret_cast<uint16_t*>(bf16_in_.data_ptr<at::BFloat16>()), y, ldy);
      return;
    }
#endif
    at::parallel_for(0, w.n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = 0; m < rows; ++m) {
        const float* xr = x + m * w.k;
        for (int64_t j = begin; j < end; ++j) {
          float sum = 0.f;
          // bf16 is the top half of a float32
          const uint16_t* wr = reinterpret_cast<const uint16_t*>(w.bf16 + j * w.k);
#pragma omp simd reduction(+ : sum)
          for (int64_t i = 0; i < w.k; ++i) {
            const uint32_t bits = static_cast<uint32_t>(wr[i]) << 16;
            float value;
            std::memcpy(&value, &bits, sizeof(value));
            sum += value * xr[i];
          }
          y[m * ldy + j] = sum;
        }
      }
    });
  }

  void run_site(int64_t site, const float* in, int64_t rows, int64_t k, float* out, int64_t n) {
    TORCH_CHECK(!sites_[site].empty(), "forward: site ", site, " has no weights");
    for (const Part& part : sites_[site]) {
      const bool all = part.rows.empty();
      const int64_t count = all ? rows : static_cast<int64_t>(part.rows.size());
      const float* src = in;
      float* dst = out;
      int64_t ld = n;
      if (!all) {
        float* gathered = gathered_in_.data_ptr<float>();
        for (int64_t i = 0; i < count; ++i) std::memcpy(gathered + i * k, in + part.rows[i] * k, k * sizeof(float));
        src = gathered;
        dst = gathered_out_.data_ptr<float>();
      }
      for (size_t i = 0; i < part.weights.size(); ++i)
        multiply(weights_[part.weights[i]], src, count, dst + part.offsets[i], ld);
      if (!all)
        for (int64_t i = 0; i < count; ++i) std::memcpy(out + part.rows[i] * n, dst + i * n, n * sizeof(float));
    }
  }

  // Each row's RoPE cos and sin, once per step for every layer: angle = position * inv_freq[i], a float32
  // product as the PyTorch passes form it (runtime/model.py), times the attention scaling. Computed, not
  // read from a table of every position (4 MiB resident for 8,192 positions).
  void rope_angles(const std::vector<int64_t>& positions, int64_t rows) {
    const int64_t half = head_dim_ / 2;
    const float* inv_freq = inv_freq_.data_ptr<float>();
    float* c = rope_cos_.data_ptr<float>();
    float* s = rope_sin_.data_ptr<float>();
    for (int64_t m = 0; m < rows; ++m) {
      const float position = static_cast<float>(positions[m]);
      for (int64_t i = 0; i < half; ++i) {
        const double angle = position * inv_freq[i];
        c[m * half + i] = static_cast<float>(std::cos(angle)) * rope_scaling_;
        s[m * half + i] = static_cast<float>(std::sin(angle)) * rope_scaling_;
      }
    }
  }

  // RoPE on the q and k heads, in place, pairs (i, i + d / 2) at a time: (a, b) -> (a cos - b sin, b cos + a sin).
  void rope(int64_t rows) {
    const int64_t width = qkv_.size(1), half = head_dim_ / 2;
    float* qkv = qkv_.data_ptr<float>();
    for (int64_t m = 0; m < rows; ++m) {
      const float* c = rope_cos_.data_ptr<float>() + m * half;
      const float* s = rope_sin_.data_ptr<float>() + m * half;
      for (int64_t head = 0; head < heads_ + kv_heads_; ++head) {
        float* low = qkv + m * width + head * head_dim_;
        float* high = low + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = low[i], b = high[i];
          low[i] = a * c[i] - b * s[i];
          high[i] = b * c[i] + a * s[i];
        }
      }
    }
  }

  // Writes each row's k and v at its position, then attends over positions 0..position of its slot.
  void attend(int64_t layer, const std::vector<int64_t>& positions, const std::vector<int64_t>& slots, int64_t rows,
              at::Tensor& k_pool, at::Tensor& v_pool) {
    const int64_t slots_total = k_pool.size(1), max_len = k_pool.size(3), width = qkv_.size(1);
    const int64_t group = heads_ / kv_heads_;
    const float scale = 1.f / std::sqrt(static_cast<float>(head_dim_));
    uint16_t* kp = reinterpret_cast<uint16_t*>(k_pool.data_ptr<at::BFloat16>());  // bf16 bits
    uint16_t* vp = reinterpret_cast<uint16_t*>(v_pool.data_ptr<at::BFloat16>());
    const float* qkv = qkv_.data_ptr<float>();
    float* attn = attn_.data_ptr<float>();
    float* scores_all = scores_.data_ptr<float>();
    auto base = [&](int64_t slot, int64_t kv_head) {
      return ((layer * slots_total + slot) * kv_heads_ + kv_head) * max_len * head_dim_;
    };
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t kv_head = 0; kv_head < kv_heads_; ++kv_head) {
        const int64_t at = base(slots[m], kv_head) + positions[m] * head_dim_;
        to_bf16(qkv + m * width + (heads_ + kv_head) * head_dim_, kp + at);
        to_bf16(qkv + m * width + (heads_ + kv_heads_ + kv_head) * head_dim_, vp + at);
      }
    at::parallel_for(0, rows * heads_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t m = task / heads_, head = task % heads_, kv_head = head / group, length = positions[m] + 1;
        const float* q = qkv + m * width + head * head_dim_;
        const uint16_t* keys = kp + base(slots[m], kv_head);
        const uint16_t* values = vp + base(slots[m], kv_head);
        float* scores = scores_all + task * max_len;
        score_keys(q, keys, length, scale, scores);
        softmax(scores, length);
        weigh_values(scores, values, length, attn + m * heads_ * head_dim_ + head * head_dim_);
      }
    });
  }

  // scores = exp(scores - max) / sum, in place.
  static void softmax(float* scores, int64_t length) {
#ifdef QUEPT_AVX512
    __m512 top_v = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < length; t += 16)
      top_v = _mm512_max_ps(top_v, _mm512_maskz_loadu_ps(tail_mask(length - t), scores + t));
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(top_v));
    __m512 total_v = _mm512_setzero_ps();
    for (int64_t t = 0; t < length; t += 16) {
      const __mmask16 mask = tail_mask(length - t);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + t), top));
      _mm512_mask_storeu_ps(scores + t, mask, e);
      total_v = _mm512_add_ps(total_v, _mm512_maskz_mov_ps(mask, e));
    }
    const __m512 inverse = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total_v));
    for (int64_t t = 0; t < length; t += 16) {
      const __mmask16 mask = tail_mask(length - t);
      _mm512_mask_storeu_ps(scores + t, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, scores + t), inverse));
    }
#else
    float top = -INFINITY;
    for (int64_t t = 0; t < length; ++t) top = std::max(top, scores[t]);
    float total = 0.f;
    for (int64_t t = 0; t < length; ++t) {
      scores[t] = std::exp(scores[t] - top);
      total += scores[t];
    }
    for (int64_t t = 0; t < length; ++t) scores[t] /= total;
#endif
  }

  // One head vector in bf16, rounded to nearest even (as torch's conversion, so prefill's keys and these match).
  void to_bf16(const float* from, uint16_t* to) const {
    int64_t i = 0;
#ifdef QUEPT_AVX512
    for (; i + 16 <= head_dim_; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(from + i)));
#endif
    for (; i < head_dim_; ++i) to[i] = c10::BFloat16(from[i]).x;
  }

  static float from_bf16(uint16_t bits) { return c10::BFloat16(bits, c10::BFloat16::from_bits()); }

  // scores[t] = scale * q . keys[t]; the head's 64 or 128 dimensions stay in registers.
  void score_keys(const float* q, const uint16_t* keys, int64_t length, float scale, float* scores) const {
#ifdef QUEPT_AVX512
    if (head_dim_ == 64) return score_keys_avx512<2>(q, keys, length, scale, scores);
    if (head_dim_ == 128) return score_keys_avx512<4>(q, keys, length, scale, scores);
#endif
    for (int64_t t = 0; t < length; ++t) {
      float dot = 0.f;
      const uint16_t* key = keys + t * head_dim_;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < head_dim_; ++i) dot += q[i] * from_bf16(key[i]);
      scores[t] = dot * scale;
    }
  }

  // out = sum_t weights[t] * values[t], accumulated in registers.
  void weigh_values(const float* weights, const uint16_t* values, int64_t length, float* out) const {
#ifdef QUEPT_AVX512
    if (head_dim_ == 64) return weigh_values_avx512<2>(weights, values, length, out);
    if (head_dim_ == 128) return weigh_values_avx512<4>(weights, values, length, out);
#endif
    for (int64_t i = 0; i < head_dim_; ++i) out[i] = 0.f;
    for (int64_t t = 0; t < length; ++t) {
      const uint16_t* value = values + t * head_dim_;
#pragma omp simd
      for (int64_t i = 0; i < head_dim_; ++i) out[i] += weights[t] * from_bf16(value[i]);
    }
  }

#ifdef QUEPT_AVX512
  // float32 lanes as two bf16 vectors whose sum is the value to about 16 significant bits (bf16 keeps 8):
  // a bf16 dot product (vdpbf16ps, exact products summed in float32) of both with bf16 keys or values is
  // the float32 product at a third (keys) to a half (values) of the instructions of widening them.
  struct Split {
    __m512bh high, low;
  };

  // 16 bf16 values (the bits of a __m256bh) as float32.
  static __m512 widen(__m256i bf16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
  }

  // 32 lanes: a's 16 in the low half, b's in the high half.
  static Split split(__m512 a, __m512 b) {
    const __m512 a_rest = _mm512_sub_ps(a, widen((__m256i)_mm512_cvtneps_pbh(a)));
    const __m512 b_rest = _mm512_sub_ps(b, widen((__m256i)_mm512_cvtneps_pbh(b)));
    return {_mm512_cvtne2ps_pbh(b, a), _mm512_cvtne2ps_pbh(b_rest, a_rest)};
  }

  // 16 lanes whose sum is query . key (D32 blocks of 32 dimensions).
  template <int D32>
  static __m512 key_products(const Split* query, const uint16_t* key) {
    __m512 high = _mm512_setzero_ps(), low = _mm512_setzero_ps();
    for (int i = 0; i < D32; ++i) {
      const __m512bh k = (__m512bh)_mm512_loadu_si512(key + 32 * i);
      high = _mm512_dpbf16_ps(high, query[i].high, k);
      low = _mm512_dpbf16_ps(low, query[i].low, k);
    }
    return _mm512_add_ps(high, low);
  }

  // (a L0 + a L1, a L2 + a L3, b L0 + b L1, b L2 + b L3) over 128-bit lanes L.
  static __m512 lane_sums(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }

  // Keys in blocks of 16: the 16 product vectors are summed by a transposition tree into one vector of
  // 16 scores (about 3 instructions a key instead of a horizontal sum each).
  template <int D32>
  static void score_keys_avx512(const float* q, const uint16_t* keys, int64_t length, float scale, float* scores) {
    Split query[D32];
    const __m512 s = _mm512_set1_ps(scale);
    for (int i = 0; i < D32; ++i)
      query[i] = split(_mm512_mul_ps(_mm512_loadu_ps(q + 32 * i), s), _mm512_mul_ps(_mm512_loadu_ps(q + 32 * i + 16), s));
    constexpr int D = 32 * D32;
    int64_t t = 0;
    for (; t + 16 <= length; t += 16) {
      __m512 pairs[8], quads[4];
      for (int i = 0; i < 8; ++i) {  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3)
        const __m512 a = key_products<D32>(query, keys + (t + 2 * i) * D);
        const __m512 b = key_products<D32>(query, keys + (t + 2 * i + 1) * D);
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
      }
      for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of keys 4i .. 4i + 3
        const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
        quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
      }
      // across the four lanes: lane L of the result is keys 4L .. 4L + 3
      const __m512 low = lane_sums(quads[0], quads[1]), high = lane_sums(quads[2], quads[3]);
      _mm512_storeu_ps(scores + t, lane_sums(low, high));
    }
    for (; t < length; ++t) scores[t] = _mm512_reduce_add_ps(key_products<D32>(query, keys + t * D));
  }

  // Two positions at a time: their values interleaved (v_t[d], v_t+1[d]) meet the pair of weights
  // (w_t, w_t+1) in one vdpbf16ps. Interleaving within 128-bit lanes leaves dimensions 8j..8j+3 of a
  // 32-dimension block in lanes 4j..4j+3 of `first` and 8j+4..8j+7 in the same lanes of `second`.
  template <int D32>
  static void weigh_values_avx512(const float* weights, const uint16_t* values, int64_t length, float* out) {
    constexpr int D = 32 * D32;
    __m512 first[2][D32], second[2][D32];  // [the weights' high or low part][block]
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < D32; ++i) first[h][i] = second[h][i] = _mm512_setzero_ps();
    alignas(64) uint16_t parts[2][32];  // the weights of 16 positions (and a zero after), high and low
    for (int64_t t0 = 0; t0 < length; t0 += 16) {
      const int64_t count = std::min<int64_t>(16, length - t0);
      const Split w = split(_mm512_maskz_loadu_ps(tail_mask(count), weights + t0), _mm512_setzero_ps());
      _mm512_store_si512(parts[0], (__m512i)w.high);
      _mm512_store_si512(parts[1], (__m512i)w.low);
      for (int64_t j = 0; j < count; j += 2) {
        const uint16_t* a = values + (t0 + j) * D;
        const uint16_t* b = j + 1 < count ? a + D : a;  // past the end: the weight is 0, the value any finite one
        __m512bh pair[2];
        for (int h = 0; h < 2; ++h) {
          int32_t two;
          std::memcpy(&two, parts[h] + j, sizeof(two));
          pair[h] = (__m512bh)_mm512_set1_epi32(two);
        }
        for (int i = 0; i < D32; ++i) {
          const __m512i va = _mm512_loadu_si512(a + 32 * i), vb = _mm512_loadu_si512(b + 32 * i);
          const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(va, vb), hi = (__m512bh)_mm512_unpackhi_epi16(va, vb);
          for (int h = 0; h < 2; ++h) {
            first[h][i] = _mm512_dpbf16_ps(first[h][i], lo, pair[h]);
            second[h][i] = _mm512_dpbf16_ps(second[h][i], hi, pair[h]);
          }
        }
      }
    }
    const __m512i low_half = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i high_half = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < D32; ++i) {
      const __m512 a = _mm512_add_ps(first[0][i], first[1][i]), b = _mm512_add_ps(second[0][i], second[1][i]);
      _mm512_storeu_ps(out + 32 * i, _mm512_permutex2var_ps(a, low_half, b));
      _mm512_storeu_ps(out + 32 * i + 16, _mm512_permutex2var_ps(a, high_half, b));
    }
  }
#endif

  void swiglu(int64_t rows) {
    const float* gu = gate_up_.data_ptr<float>();
    float* act = act_.data_ptr<float>();
    for (int64_t m = 0; m < rows; ++m) {
      const float* gate = gu + m * 2 * ffn_;
      const float* up = gate + ffn_;
      float* out = act + m * ffn_;
#ifdef QUEPT_AVX512
      for (int64_t j = 0; j < ffn_; j += 16) {
        const __mmask16 mask = tail_mask(ffn_ - j);
        const __m512 g = _mm512_maskz_loadu_ps(mask, gate + j);
        const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_mask_storeu_ps(out + j, mask, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(mask, up + j)));
      }
#else
      for (int64_t j = 0; j < ffn_; ++j) out[j] = gate[j] / (1.f + std::exp(-gate[j])) * up[j];
#endif
    }
  }

  int64_t layers_, hidden_, ffn_, heads_, kv_heads_, head_dim_, vocab_, max_rows_;
  float eps_;
  std::vector<at::Tensor> norms_;
  at::Tensor inv_freq_;
  float rope_scaling_;
  std::vector<std::vector<Part>> sites_;
  std::vector<Part> embedding_;
  std::vector<Weight> weights_;
  std::vector<at::Tensor> keep_;  // the storage the weights point into
  at::Tensor x_, h_, qkv_, attn_, gate_up_, act_, delta_, gathered_in_, gathered_out_, quantized_, steps_, lut_weights_, sums_, bf16_in_, scores_, rope_cos_, rope_sin_;
};

}  // namespace

#ifndef QUEPT_OPS
#define QUEPT_OPS quept
#endif

TORCH_LIBRARY_FRAGMENT(QUEPT_OPS, m) {
  m.class_<DecodeProgram>("DecodeProgram")
      .def(torch::init<std::vector<int64_t>, double, std::vector<at::Tensor>, at::Tensor, double>())
      .def("add_planes", &DecodeProgram::add_planes)
      .def("add_lut", &DecodeProgram::add_lut)
      .def("add_dense", &DecodeProgram::add_dense)
      .def("add_part", &DecodeProgram::add_part)
      .def("add_embedding", &DecodeProgram::add_embedding)
      .def("clear_parts", &DecodeProgram::clear_parts)
      .def("forward", &DecodeProgram::forward)
      .def("weight_count", &DecodeProgram::weight_count);
}
