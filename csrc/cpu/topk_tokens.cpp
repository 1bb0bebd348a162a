// Top-k token selection on the CPU: one row (b, h) per OpenMP iteration, std::nth_element over the middle tokens.
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "../ops.h"

namespace sparse_attn {
namespace {

// Writes the selected token ids of one row, ascending, and returns their count.
int32_t select_row(const float* scores, int64_t len, int64_t budget, int64_t sink, int64_t recent, int32_t* out,
                   std::vector<int32_t>& middle) {
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
  middle.resize(recent_start - sink_end);
  std::iota(middle.begin(), middle.end(), static_cast<int32_t>(sink_end));
  auto ranks_higher = [scores](int32_t a, int32_t b) {
    const uint32_t ka = ordered_key(scores[a]), kb = ordered_key(scores[b]);
    return ka > kb || (ka == kb && a < b);
  };
  std::nth_element(middle.begin(), middle.begin() + need, middle.end(), ranks_higher);
  std::sort(middle.begin(), middle.begin() + need);

  int32_t* p = out;
  for (int64_t i = 0; i < sink_end; ++i) *p++ = static_cast<int32_t>(i);
  p = std::copy(middle.begin(), middle.begin() + need, p);
  for (int64_t i = recent_start; i < len; ++i) *p++ = static_cast<int32_t>(i);
  return static_cast<int32_t>(forced + need);
}

}  // namespace

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
    std::vector<int32_t> middle;  // per-thread scratch
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
