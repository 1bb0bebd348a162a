// Top-k token selection on the CPU: one row (b, h) per OpenMP iteration, std::nth_element over the middle tokens.
// decode_select_cpu scores the tokens first (Double Sparsity labels or exact keys, read from the pages in place).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include "../ops.h"
#include "kernel_utils.h"

namespace sparse_attn {
namespace {

// Writes the selected token ids of one row, ascending, and returns their count.
int32_t select_row(const float* scores, int64_t len, int64_t budget, int64_t sink, int64_t recent, int32_t* out,
                   std::vector<uint64_t>& middle) {
  if (len <= budget) {  // everything fits
    std::iota(out, out + len, 0);
    return static_cast<int32_t>(len);
  }
  // Tokens [0, sink_end) and [recent_start, len) are always kept; the rest of the budget goes to the middle tokens
  // with the highest scores (len > budget leaves more middle tokens than needed).
  const int64_t sink_end = std::min(sink, len);
  const int64_t recent_start = std::max(len - recent, sink_end);
  const int64_t forced = sink_end + (len - recent_start);
  const int64_t need = std::max<int64_t>(budget - forced, 0);
  // One 64-bit key per token: the score's order above, the complemented index below, so that a larger key ranks
  // higher and ties go to the lower index; plain integer comparisons then do the selection.
  middle.resize(recent_start - sink_end);
  for (int64_t t = sink_end; t < recent_start; ++t) {
    middle[t - sink_end] = (uint64_t{ordered_key(scores[t])} << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(t));
  }
  std::nth_element(middle.begin(), middle.begin() + need, middle.end(), std::greater<uint64_t>());
  int32_t* p = out;
  for (int64_t i = 0; i < sink_end; ++i) *p++ = static_cast<int32_t>(i);
  for (int64_t i = 0; i < need; ++i) p[i] = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(middle[i]));
  std::sort(p, p + need);
  p += need;
  for (int64_t i = recent_start; i < len; ++i) *p++ = static_cast<int32_t>(i);
  return static_cast<int32_t>(forced + need);
}

// Scores of the tokens [0, len) of sequence b for KV head g: per query head of the group, q[channels] . label,
// reduced over the group (max or sum) or one row per query head. Labels are rows of `labels` (stride per token
// row, per KV head), r values each; with pruned slots (slot_keep > 0) a row is a packed K slot and the label is the
// unpacked key (r == D, channels the identity).
// dots[h] = q_label[h] . x for the group's heads (r channels each).
SPARSE_ATTN_ISA_CLONES
void group_dots(const float* q_label, int64_t group, int64_t r, const float* x, float* dots) {
  for (int64_t h = 0; h < group; ++h) {
    const float* qh = q_label + h * r;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < r; ++c) dot += qh[c] * x[c];
    dots[h] = dot;
  }
}

template <typename T>
void score_tokens(const DecodeSelectInputs& in, const float* q_label, int64_t rows_out, int64_t b, int64_t g,
                  int64_t len, float* out) {
  const int64_t r = in.channels.size(1), dim = in.q.size(2), group = in.q.size(1) / in.channels.size(0);
  const T* labels = in.labels.data_ptr<T>() + g * in.labels.stride(1);
  const int64_t stride = in.labels.stride(0), page = in.page_size;
  const int32_t* table = in.block_table.data_ptr<int32_t>() + b * in.block_table.stride(0);
  const bool reduce_max = in.reduce_max;
  float dense[256];  // one label as fp32 (head_dim <= 256, checked)
  for (int64_t t = 0; t < len; ++t) {
    const T* row = labels + (int64_t{table[t / page]} * page + t % page) * stride;
    const float* x;
    if (in.slot_keep > 0) {  // exact scores on a pruned key: unpack its kept channels
      const uint8_t* bits = reinterpret_cast<const uint8_t*>(row + 2 * in.slot_keep);
      const int64_t bytes = (dim + 7) / 8;
      unpack_vector(row, [&](int64_t j) {
        return static_cast<uint16_t>(bits[2 * j] | (2 * j + 1 < bytes ? bits[2 * j + 1] << 8 : 0));
      }, dim, dense);
      x = dense;
    } else if constexpr (std::is_same_v<T, float>) {
      x = row;
    } else {
      for (int64_t c = 0; c < r; ++c) dense[c] = static_cast<float>(row[c]);
      x = dense;
    }
    float dots[256];
    group_dots(q_label, group, r, x, dots);
    if (rows_out > 1) {
      for (int64_t h = 0; h < group; ++h) out[h * len + t] = dots[h];
    } else {
      float reduced = dots[0];
      for (int64_t h = 1; h < group; ++h) reduced = reduce_max ? std::max(reduced, dots[h]) : reduced + dots[h];
      out[t] = reduced;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_select_cpu(const DecodeSelectInputs& in) {
  const int64_t batch = in.q.size(0), q_heads = in.q.size(1), kv_heads = in.channels.size(0);
  const int64_t group = q_heads / kv_heads, r = in.channels.size(1), k = in.width;
  const int64_t heads = in.per_group ? kv_heads : q_heads, rows_per_item = in.per_group ? 1 : group;
  // A row never keeps more than `width` tokens: the sink tokens first, then as many recent ones as fit.
  const int64_t sink = std::min(in.sink, k), recent = std::min(in.recent, k - sink);
  auto indices = at::zeros({batch, heads, k}, in.q.options().dtype(at::kInt));  // zero padding past the count
  auto counts = at::zeros({batch, heads}, in.q.options().dtype(at::kInt));
  const int32_t* lens = in.kv_lens.data_ptr<int32_t>();
  const int32_t* budgets = in.budgets.data_ptr<int32_t>();
  const int64_t* channels = in.channels.data_ptr<int64_t>();
  int32_t* idx = indices.data_ptr<int32_t>();
  int32_t* cnt = counts.data_ptr<int32_t>();
  const auto q = in.q.to(at::kFloat).contiguous();
  const float* qf = q.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.labels.scalar_type(), "decode_select_cpu", [&] {
    at::parallel_for(0, batch * kv_heads, 1, [&](int64_t first, int64_t last) {
      std::vector<float> scores, q_label(group * r);
      std::vector<uint64_t> middle;
      for (int64_t item = first; item < last; ++item) {
        const int64_t b = item / kv_heads, g = item % kv_heads, len = lens[b];
        const int64_t budget = std::clamp<int64_t>(budgets[b], 0, k);
        const int64_t row0 = b * heads + (in.per_group ? g : g * group);
        if (len <= budget) {  // every token fits: no scores needed
          for (int64_t j = 0; j < rows_per_item; ++j) {
            std::iota(idx + (row0 + j) * k, idx + (row0 + j) * k + len, 0);
            cnt[row0 + j] = static_cast<int32_t>(len);
          }
          continue;
        }
        for (int64_t h = 0; h < group; ++h) {
          const float* qh = qf + (b * q_heads + g * group + h) * q.size(2);
          for (int64_t c = 0; c < r; ++c) q_label[h * r + c] = qh[channels[g * r + c]];
        }
        scores.resize(rows_per_item * len);
        score_tokens<scalar_t>(in, q_label.data(), rows_per_item, b, g, len, scores.data());
        for (int64_t j = 0; j < rows_per_item; ++j) {
          cnt[row0 + j] = select_row(scores.data() + j * len, len, budget, sink, recent, idx + (row0 + j) * k, middle);
        }
      }
    });
  });
  return {indices, counts};
}

std::tuple<at::Tensor, at::Tensor> topk_tokens_cpu(const at::Tensor& scores, const at::Tensor& lengths, int64_t k,
                                                   int64_t sink, int64_t recent,
                                                   const std::optional<at::Tensor>& budgets) {
  const int64_t batch = scores.size(0), heads = scores.size(1), max_len = scores.size(2);
  auto indices = at::zeros({batch, heads, k}, scores.options().dtype(at::kInt));  // zero padding past the count
  auto counts = at::zeros({batch, heads}, scores.options().dtype(at::kInt));
  const float* s = scores.data_ptr<float>();
  const int32_t* len = lengths.data_ptr<int32_t>();
  int32_t* idx = indices.data_ptr<int32_t>();
  int32_t* cnt = counts.data_ptr<int32_t>();
  const int32_t* budget = budgets ? budgets->data_ptr<int32_t>() : nullptr;
#pragma omp parallel
  {
    std::vector<uint64_t> middle;  // per-thread scratch
#pragma omp for schedule(dynamic, 4)
    for (int64_t row = 0; row < batch * heads; ++row) {
      const int64_t b = row / heads;
      const int64_t row_len = std::clamp<int64_t>(len[b], 0, max_len);
      const int64_t row_budget = budget ? std::clamp<int64_t>(budget[b], 0, k) : k;
      cnt[row] = select_row(s + row * max_len, row_len, row_budget, sink, recent, idx + row * k, middle);
    }
  }
  return {indices, counts};
}

}  // namespace sparse_attn
