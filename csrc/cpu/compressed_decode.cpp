// Decode attention on the bitmap-compressed KV cache, CPU, flash-decoding style.
//
// A sequence's context is its compressed tokens (per token and KV head: a 64-bit keep bitmap per 64-channel tile and
// the kept values in channel order) followed by its dense recent window. One work item is (sequence, KV head, a slice
// of the context); it serves all query heads of the GQA group, so each compressed token is unpacked once per step.
// Tokens are unpacked kTileTokens at a time into a dense fp32 tile (one expand-load per 16 channels on AVX-512), then
//   S = Q K^T,  online softmax in base 2 (m, l per head),  acc = acc 2^(m - m') + P V,
// and the slices of a split context are merged through their log-sum-exps. Long contexts of few sequences (batch-1
// decode) are split so every thread has work.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "../ops.h"
#include "kernel_utils.h"

namespace sparse_attn {
namespace {

constexpr int64_t kTileTokens = 128;
constexpr int64_t kMinSliceTokens = 512;
constexpr int64_t kItemsPerThread = 4;

struct Slice {
  int64_t bh, begin, end;  // (sequence, KV head) and its context tokens [begin, end)
};

template <typename T>
void decode(const CompressedDecodeInputs& in, at::Tensor& out, at::Tensor& lse) {
  const int64_t batch = in.q.size(0), q_heads = in.q.size(1), dim = in.q.size(2);
  const int64_t kv_heads = in.offsets.size(1), group = q_heads / kv_heads, window = in.k_recent.size(2);
  const int64_t tiles = num_tiles(dim), k_keep = in.k_keep, v_keep = in.v_keep;
  const float mul = static_cast<float>(in.scale) * kLog2e;
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

  // Work: every (sequence, KV head), its context cut into slices when there are few of them.
  const int64_t threads = at::get_num_threads();
  std::vector<Slice> slices;
  std::vector<int64_t> first_slice(batch * kv_heads + 1, 0);
  const int64_t rows = batch * kv_heads;
  for (int64_t bh = 0; bh < rows; ++bh) {
    const int64_t b = bh / kv_heads, n = int64_t{comp_len[b]} + rec_len[b];
    int64_t pieces = 1;
    if (threads > 1 && rows < threads * kItemsPerThread) {
      pieces = std::max<int64_t>(1, std::min((threads * kItemsPerThread + rows - 1) / rows, n / kMinSliceTokens));
    }
    for (int64_t s = 0; s < pieces; ++s) slices.push_back({bh, n * s / pieces, n * (s + 1) / pieces});
    first_slice[bh + 1] = static_cast<int64_t>(slices.size());
  }
  const int64_t num = static_cast<int64_t>(slices.size());
  std::vector<float> part_out(num * group * dim), part_lse(num * group);

  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(1, std::min(threads, num)), 1, [&](int64_t, int64_t) {
    std::vector<float> qf(group * dim), kt(kTileTokens * dim), vt(kTileTokens * dim), s(group * kTileTokens);
    std::vector<float> acc(group * dim), row_max(group), row_sum(group);
    for (int64_t i = next.fetch_add(1); i < num; i = next.fetch_add(1)) {
      const Slice& sl = slices[i];
      const int64_t b = sl.bh / kv_heads, head0 = b * q_heads + (sl.bh % kv_heads) * group;
      const int64_t n_comp = comp_len[b];
      for (int64_t e = 0; e < group * dim; ++e) qf[e] = static_cast<float>(q[head0 * dim + e]) * mul;
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      for (int64_t t0 = sl.begin; t0 < sl.end; t0 += kTileTokens) {
        const int64_t n = std::min(kTileTokens, sl.end - t0);
        for (int64_t j = 0; j < n; ++j) {  // unpack (or copy) the tile's K and V
          const int64_t t = t0 + j;
          if (t < n_comp) {
            const int64_t slot = offsets[sl.bh] + t;
            const uint64_t* kb = k_bits + slot * tiles;
            const uint64_t* vb = v_bits + slot * tiles;
            unpack_vector(k_vals + slot * k_keep, [&](int64_t c) { return uint16_t(kb[c / 4] >> (16 * (c % 4))); },
                          dim, kt.data() + j * dim);
            unpack_vector(v_vals + slot * v_keep, [&](int64_t c) { return uint16_t(vb[c / 4] >> (16 * (c % 4))); },
                          dim, vt.data() + j * dim);
          } else {
            const int64_t r = (sl.bh * window + (t - n_comp)) * dim;
            to_float(k_rec + r, dim, 1, dim, 1.0f, kt.data() + j * dim);
            to_float(v_rec + r, dim, 1, dim, 1.0f, vt.data() + j * dim);
          }
        }
        gemm_abt(false, group, n, dim, qf.data(), dim, RowsOf(kt.data(), dim), s.data(), kTileTokens);
        softmax_update(s.data(), kTileTokens, group, n, row_max.data(), row_sum.data(), acc.data(), dim);
        gemm_ab_acc_loops(group, dim, n, s.data(), kTileTokens, RowsOf(vt.data(), dim), acc.data(), dim);
      }
      for (int64_t h = 0; h < group; ++h) {
        const float sum = row_sum[h];
        const float inv = sum == 0.0f ? 0.0f : 1.0f / sum;  // a NaN sum (NaN or +inf scores) gives NaN
        for (int64_t e = 0; e < dim; ++e) part_out[(i * group + h) * dim + e] = acc[h * dim + e] * inv;
        part_lse[i * group + h] = sum == 0.0f ? kNegInf : (row_max[h] + std::log2(sum)) * kLn2;
      }
    }
  });

  // Merge the slices of every (sequence, KV head): lse = log sum e^lse_s, out = sum_s e^(lse_s - lse) out_s.
  for (int64_t bh = 0; bh < rows; ++bh) {
    const int64_t b = bh / kv_heads, head0 = b * q_heads + (bh % kv_heads) * group;
    for (int64_t h = 0; h < group; ++h) {
      float top = kNegInf;
      bool nan = false;  // a NaN slice (std::max skips it) makes the merged row NaN
      for (int64_t i = first_slice[bh]; i < first_slice[bh + 1]; ++i) {
        top = std::max(top, part_lse[i * group + h]);
        nan |= part_lse[i * group + h] != part_lse[i * group + h];
      }
      T* dst = o + (head0 + h) * dim;
      if (top == kNegInf && !nan) {  // no keys: out 0, lse -inf
        std::fill(dst, dst + dim, static_cast<T>(0.0f));
        l[head0 + h] = kNegInf;
        continue;
      }
      float total = 0.0f;
      std::vector<float> merged(dim, 0.0f);
      for (int64_t i = first_slice[bh]; i < first_slice[bh + 1]; ++i) {
        const float w = std::exp(part_lse[i * group + h] - top);
        total += w;
        for (int64_t e = 0; e < dim; ++e) merged[e] += w * part_out[(i * group + h) * dim + e];
      }
      for (int64_t e = 0; e < dim; ++e) dst[e] = static_cast<T>(merged[e] / total);
      l[head0 + h] = top + std::log(total);
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
