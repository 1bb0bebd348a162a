// Decode attention on the bitmap-compressed KV cache, CPU. One (sequence, KV head) per OpenMP iteration serves all
// query heads of its GQA group, so each compressed tile is decoded once per step.
//
// q.K and P.V run on the packed values: the set bits of a tile's bitmap, visited low to high, are the channels of
// that tile's values in storage order (tile c of a token starts after the popcounts of tiles 0..c-1).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../ops.h"

namespace sparse_attn {
namespace {

// Calls fn(channel, value) for every kept channel of one compressed token.
template <typename T, typename Fn>
inline void for_each_kept(const uint64_t* bitmaps, const T* values, int64_t tiles, Fn&& fn) {
  for (int64_t c = 0; c < tiles; ++c) {
    for (uint64_t bits = bitmaps[c]; bits; bits &= bits - 1) {
      fn(c * 64 + __builtin_ctzll(bits), static_cast<float>(*values++));
    }
  }
}

template <typename T>
void decode(const CompressedDecodeInputs& in, at::Tensor& out, at::Tensor& lse) {
  const int64_t batch = in.q.size(0), q_heads = in.q.size(1), dim = in.q.size(2);
  const int64_t kv_heads = in.offsets.size(1), group = q_heads / kv_heads, window = in.k_recent.size(2);
  const int64_t tiles = num_tiles(dim), k_keep = in.k_keep, v_keep = in.v_keep;
  const float scale = static_cast<float>(in.scale);
  const T* q = in.q.data_ptr<T>();
  const auto* k_bits = reinterpret_cast<const uint64_t*>(in.k_bitmaps.data_ptr<int64_t>());
  const auto* v_bits = reinterpret_cast<const uint64_t*>(in.v_bitmaps.data_ptr<int64_t>());
  const T* k_vals = in.k_values.data_ptr<T>();
  const T* v_vals = in.v_values.data_ptr<T>();
  const T* k_rec = in.k_recent.data_ptr<T>();
  const T* v_rec = in.v_recent.data_ptr<T>();
  const int64_t* offsets = in.offsets.data_ptr<int64_t>();
  const int32_t* comp_len = in.comp_lengths.data_ptr<int32_t>();
  const int32_t* rec_len = in.recent_lengths.data_ptr<int32_t>();
  T* o = out.data_ptr<T>();
  float* l = lse.data_ptr<float>();

#pragma omp parallel
  {
    std::vector<float> qf(group * dim), acc(group * dim), denom(group), probs;  // per-thread scratch
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < batch * kv_heads; ++bh) {
      const int64_t b = bh / kv_heads, g = bh % kv_heads, head0 = b * q_heads + g * group;
      const int64_t n_comp = comp_len[b], n_rec = rec_len[b], n = n_comp + n_rec;
      if (n == 0) {  // no keys: out 0, lse -inf
        std::fill(o + head0 * dim, o + (head0 + group) * dim, static_cast<T>(0.0f));
        std::fill(l + head0, l + head0 + group, -std::numeric_limits<float>::infinity());
        continue;
      }
      for (int64_t i = 0; i < group * dim; ++i) qf[i] = static_cast<float>(q[head0 * dim + i]) * scale;

      // Scores s[t * group + h] = scale * q_h . k_t.
      probs.assign(n * group, 0.0f);
      for (int64_t t = 0; t < n_comp; ++t) {
        const int64_t slot = offsets[bh] + t;
        float* s = &probs[t * group];
        for_each_kept(k_bits + slot * tiles, k_vals + slot * k_keep, tiles, [&](int64_t e, float x) {
          for (int64_t h = 0; h < group; ++h) s[h] += qf[h * dim + e] * x;
        });
      }
      const T* k_win = k_rec + bh * window * dim;
      for (int64_t t = 0; t < n_rec; ++t) {
        float* s = &probs[(n_comp + t) * group];
        for (int64_t h = 0; h < group; ++h) {
          float dot = 0.0f;
          for (int64_t e = 0; e < dim; ++e) dot += qf[h * dim + e] * static_cast<float>(k_win[t * dim + e]);
          s[h] = dot;
        }
      }

      // Softmax per head: p = exp(s - max) / sum, lse = max + log(sum).
      for (int64_t h = 0; h < group; ++h) {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n; ++t) m = std::max(m, probs[t * group + h]);
        float sum = 0.0f;
        for (int64_t t = 0; t < n; ++t) sum += (probs[t * group + h] = std::exp(probs[t * group + h] - m));
        denom[h] = sum;
        l[head0 + h] = m + std::log(sum);
      }

      // out_h = sum_t p_t v_t / sum.
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = 0; t < n_comp; ++t) {
        const int64_t slot = offsets[bh] + t;
        const float* p = &probs[t * group];
        for_each_kept(v_bits + slot * tiles, v_vals + slot * v_keep, tiles, [&](int64_t e, float x) {
          for (int64_t h = 0; h < group; ++h) acc[h * dim + e] += p[h] * x;
        });
      }
      const T* v_win = v_rec + bh * window * dim;
      for (int64_t t = 0; t < n_rec; ++t) {
        const float* p = &probs[(n_comp + t) * group];
        for (int64_t h = 0; h < group; ++h) {
          for (int64_t e = 0; e < dim; ++e) acc[h * dim + e] += p[h] * static_cast<float>(v_win[t * dim + e]);
        }
      }
      for (int64_t h = 0; h < group; ++h) {
        for (int64_t e = 0; e < dim; ++e) o[(head0 + h) * dim + e] = static_cast<T>(acc[h * dim + e] / denom[h]);
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> compressed_decode_attention_cpu(const CompressedDecodeInputs& in) {
  auto out = at::empty(in.q.sizes(), in.q.options());
  auto lse = at::empty({in.q.size(0), in.q.size(1)}, in.q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "compressed_decode_attention_cpu",
                                  [&] { decode<scalar_t>(in, out, lse); });
  return {out, lse};
}

}  // namespace sparse_attn
