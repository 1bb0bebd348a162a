// Top-k token selection on the CPU: one row (b, h) per OpenMP iteration, a radix select over the middle tokens.
// decode_select_cpu scores the tokens first (Double Sparsity labels or exact keys, read from the pages in place).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "../ops.h"
#include "kernel_utils.h"

namespace sparse_attn {
namespace {

// The key of rank `need` (1-based, need >= 1) among keys[0, n), largest first, by a radix select on 11/11/10-bit
// digits, and how many keys equal to it are taken to make `need` (ties go to the lower index). The first digit is
// counted over all keys; the keys in its chosen bin (a small fraction) are copied out and the two lower digits are
// counted over them only.
std::pair<uint32_t, int64_t> kth_largest(const uint32_t* keys, int64_t n, int64_t need) {
  thread_local std::vector<uint32_t> candidates;
  constexpr int kShifts[3] = {21, 10, 0};
  constexpr int kBits[3] = {11, 11, 10};
  int64_t hist[1 << 11];
  int64_t remaining = need;  // the rank still sought among the keys that match the prefix
  std::fill(hist, hist + (1 << 11), 0);
  for (int64_t i = 0; i < n; ++i) ++hist[keys[i] >> 21];
  int64_t above = 0;
  uint32_t bin = (1u << 11) - 1;
  while (above + hist[bin] < remaining) above += hist[bin--];  // stops: the bins hold >= remaining keys
  uint32_t prefix = bin << 21;
  remaining -= above;
  candidates.resize(hist[bin] + 1);  // + 1: the branch-free copy below writes one past the last candidate
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    candidates[m] = keys[i];
    m += (keys[i] >> 21) == bin;
  }
  for (int d = 1; d < 3; ++d) {
    const int shift = kShifts[d];
    const uint32_t bins = 1u << kBits[d], digit_mask = bins - 1;
    const uint32_t high_mask = ~((1u << (shift + kBits[d])) - 1);  // the digits already fixed
    std::fill(hist, hist + bins, 0);
    for (int64_t i = 0; i < m; ++i) {
      const uint32_t key = candidates[i];
      hist[(key >> shift) & digit_mask] += (key & high_mask) == prefix;
    }
    above = 0;
    bin = bins - 1;
    while (above + hist[bin] < remaining) above += hist[bin--];
    prefix |= bin << shift;
    remaining -= above;
  }
  return {prefix, remaining};
}

// Writes the selected token ids of one row, ascending, and returns their count.
int32_t select_row(const float* scores, int64_t len, int64_t budget, int64_t sink, int64_t recent, int32_t* out,
                   std::vector<uint32_t>& keys) {
  if (len <= budget) {  // everything fits
    std::iota(out, out + len, 0);
    return static_cast<int32_t>(len);
  }
  // Tokens [0, sink_end) and [recent_start, len) are always kept; the rest of the budget goes to the middle tokens
  // with the highest scores (len > budget leaves more middle tokens than needed): those whose key lies above the
  // need-th largest, then the lowest-indexed of those equal to it. One scan in token order writes them ascending.
  const int64_t sink_end = std::min(sink, len);
  const int64_t recent_start = std::max(len - recent, sink_end);
  const int64_t forced = sink_end + (len - recent_start);
  const int64_t need = std::max<int64_t>(budget - forced, 0);
  int32_t* p = out;
  for (int64_t i = 0; i < sink_end; ++i) *p++ = static_cast<int32_t>(i);
  if (need > 0) {
    const int64_t n = recent_start - sink_end;
    keys.resize(n);
    for (int64_t i = 0; i < n; ++i) keys[i] = ordered_key(scores[sink_end + i]);
    auto [threshold, equal] = kth_largest(keys.data(), n, need);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t key = keys[i];
      if (key > threshold || (key == threshold && equal-- > 0)) *p++ = static_cast<int32_t>(sink_end + i);
    }
  }
  for (int64_t i = recent_start; i < len; ++i) *p++ = static_cast<int32_t>(i);
  return static_cast<int32_t>(p - out);
}

// dots[h] = q_label[h] . x for the group's heads (r channels each); r a multiple of 16 sums 16 lanes as a tree.
inline __attribute__((always_inline)) void group_dots(const float* q_label, int64_t group, int64_t r, const float* x, float* dots) {
  for (int64_t h = 0; h < group; ++h) {
    const float* qh = q_label + h * r;
    if (r % 16 == 0) {
      alignas(64) float lanes[16] = {};
      for (int64_t c0 = 0; c0 < r; c0 += 16) {
#pragma omp simd
        for (int64_t l = 0; l < 16; ++l) lanes[l] += qh[c0 + l] * x[c0 + l];
      }
      dots[h] = lane_sum16(lanes);
      continue;
    }
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < r; ++c) dot += qh[c] * x[c];
    dots[h] = dot;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// score_run on AVX-512 for r a multiple of 16: 16 tokens at a time, through dots16 (four query heads per pass), the
// group reduced lane-wise (max keeps the running value where a score is NaN, as std::max does).
SPARSE_ATTN_AVX512 void score_run_avx512(const float* q_label, int64_t group, int64_t r, const float* x, int64_t stride,
                                         int64_t n, int64_t rows_out, bool reduce_max, float* out, int64_t row_stride) {
  const float* rows[16];
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const int64_t w = std::min<int64_t>(16, n - i0);
    for (int64_t t = 0; t < 16; ++t) rows[t] = x + (i0 + (t < w ? t : 0)) * stride;  // lanes past n: not stored
    const __mmask16 keep = static_cast<__mmask16>((1u << w) - 1);
    __m512 reduced = _mm512_setzero_ps();
    for (int64_t h0 = 0; h0 < group; h0 += 4) {
      const int64_t m = std::min<int64_t>(4, group - h0);
      __m512 dots[4];
      const float* q = q_label + h0 * r;
      switch (m) {
        case 1: dots16<1>(q, r, r, rows, dots); break;
        case 2: dots16<2>(q, r, r, rows, dots); break;
        case 3: dots16<3>(q, r, r, rows, dots); break;
        default: dots16<4>(q, r, r, rows, dots); break;
      }
      for (int64_t i = 0; i < m; ++i) {
        const int64_t h = h0 + i;
        if (rows_out > 1) {
          _mm512_mask_storeu_ps(out + h * row_stride + i0, keep, dots[i]);
        } else if (h == 0) {
          reduced = dots[i];
        } else {
          reduced = reduce_max ? _mm512_max_ps(dots[i], reduced) : _mm512_add_ps(reduced, dots[i]);
        }
      }
    }
    if (rows_out == 1) _mm512_mask_storeu_ps(out + i0, keep, reduced);
  }
}

// score_run on AVX2 for r a multiple of 8: 8 tokens at a time through dots8 (three query heads per pass).
SPARSE_ATTN_AVX2 void score_run_avx2(const float* q_label, int64_t group, int64_t r, const float* x, int64_t stride,
                                     int64_t n, int64_t rows_out, bool reduce_max, float* out, int64_t row_stride) {
  const float* rows[8];
  __m256 dots[256];
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    const int64_t w = std::min<int64_t>(8, n - i0);
    for (int64_t t = 0; t < 8; ++t) rows[t] = x + (i0 + (t < w ? t : 0)) * stride;  // lanes past n: not stored
    dots8_rows(group, q_label, r, r, rows, dots);
    if (rows_out > 1) {
      for (int64_t h = 0; h < group; ++h) store_lanes8(out + h * row_stride + i0, w, dots[h]);
      continue;
    }
    __m256 reduced = dots[0];
    for (int64_t h = 1; h < group; ++h) {
      reduced = reduce_max ? _mm256_max_ps(dots[h], reduced) : _mm256_add_ps(reduced, dots[h]);
    }
    store_lanes8(out + i0, w, reduced);
  }
}

#endif

// The vector score_run this machine has for r channels (AVX-512, AVX2), or null.
using ScoreRun = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, bool, float*,
                          int64_t);
ScoreRun vector_score_run(int64_t r) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (r % 16 == 0 && has_avx512()) return score_run_avx512;
  if (r % 8 == 0 && has_avx2()) return score_run_avx2;
#endif
  (void)r;
  return nullptr;
}

// Scores of `n` fp32 labels at rows x, x + stride, ... (one page's run of tokens): out[h * row_stride + i] per query
// head (rows_out > 1) or reduced over the group into out[i].
SPARSE_ATTN_ISA_CLONES
void score_run(const float* q_label, int64_t group, int64_t r, const float* x, int64_t stride, int64_t n,
               int64_t rows_out, bool reduce_max, float* out, int64_t row_stride) {
  float dots[256];
  for (int64_t i = 0; i < n; ++i, x += stride) {
    group_dots(q_label, group, r, x, dots);
    if (rows_out > 1) {
      for (int64_t h = 0; h < group; ++h) out[h * row_stride + i] = dots[h];
    } else {
      float reduced = dots[0];
      for (int64_t h = 1; h < group; ++h) reduced = reduce_max ? std::max(reduced, dots[h]) : reduced + dots[h];
      out[i] = reduced;
    }
  }
}

// Scores of the tokens [begin, end) of sequence b for KV head g: per query head of the group, q[channels] . label,
// reduced over the group (max or sum) or one row per query head (row h at out + h * row_stride). Labels are rows of
// `labels` (stride per token row, per KV head), r values each; with pruned slots (slot_keep > 0) a row is a packed K
// slot and the label is the unpacked key (r == D, channels the identity).
template <typename T>
void score_tokens(const DecodeSelectInputs& in, const float* q_label, int64_t rows_out, int64_t b, int64_t g,
                  int64_t begin, int64_t end, float* out, int64_t row_stride) {
  const int64_t r = in.channels.size(1), dim = in.q.size(2), group = in.q.size(1) / in.channels.size(0);
  const T* labels = in.labels.data_ptr<T>() + g * in.labels.stride(1);
  const int64_t stride = in.labels.stride(0), page = in.page_size;
  const int32_t* table = in.block_table.data_ptr<int32_t>() + b * in.block_table.stride(0);
  const int64_t row_bytes = (in.slot_keep > 0 ? 2 * in.slot_keep + (dim + 7) / 8 : r) * int64_t{sizeof(T)};
  const ScoreRun fast = vector_score_run(r);
  float dense[256];  // one label as fp32 (head_dim <= 256, checked)
  float chunk[16 * 256];  // quantized labels: 16 tokens dequantized
  const at::Half* scales = nullptr;  // quantized labels: the scale of (slot, head g) at scales[slot * scale_stride]
  int64_t scale_stride = 0;
  if constexpr (std::is_integral_v<T>) {
    scales = in.label_scales.data_ptr<at::Half>() + g * in.label_scales.stride(1);
    scale_stride = in.label_scales.stride(0);
  }
  // Page by page: the tokens of one page are consecutive rows; the next page's rows are prefetched meanwhile.
  for (int64_t t = begin; t < end;) {
    const int64_t page_end = std::min(end, (t / page + 1) * page), n = page_end - t;
    const T* row = labels + (int64_t{table[t / page]} * page + t % page) * stride;
    if (page_end < end) {
      const T* next = labels + int64_t{table[page_end / page]} * page * stride;
      for (int64_t i = 0; i < std::min(page, end - page_end); ++i) {
        const char* at = reinterpret_cast<const char*>(next + i * stride);
        for (int64_t byte = 0; byte < row_bytes; byte += 64) __builtin_prefetch(at + byte, 0, 3);
      }
    }
    if constexpr (std::is_integral_v<T>) {
      // Quantized labels (code * scale; int8, or int4 two per byte), dequantized 16 tokens at a time into fp32 rows
      // and scored like unquantized ones.
      for (int64_t i0 = 0; i0 < n; i0 += 16) {
        const int64_t m = std::min<int64_t>(16, n - i0);
        const int64_t slot0 = int64_t{table[t / page]} * page + t % page + i0;
        for (int64_t i = 0; i < m; ++i) {
          const T* code = row + (i0 + i) * stride;
          const float scale = static_cast<float>(scales[(slot0 + i) * scale_stride]);
          float* dst = chunk + i * r;
          if constexpr (std::is_same_v<T, uint8_t>) {
            for (int64_t c = 0; c + 1 < r; c += 2) {
              dst[c] = static_cast<float>((code[c / 2] & 15) - 8) * scale;
              dst[c + 1] = static_cast<float>((code[c / 2] >> 4) - 8) * scale;
            }
            if (r % 2) dst[r - 1] = static_cast<float>((code[r / 2] & 15) - 8) * scale;
          } else {
#pragma omp simd
            for (int64_t c = 0; c < r; ++c) dst[c] = static_cast<float>(code[c]) * scale;
          }
        }
        if (fast != nullptr) {
          fast(q_label, group, r, chunk, r, m, rows_out, in.reduce_max, out + t + i0, row_stride);
          continue;
        }
        score_run(q_label, group, r, chunk, r, m, rows_out, in.reduce_max, out + t + i0, row_stride);
      }
      t = page_end;
      continue;
    }
    if constexpr (std::is_same_v<T, float>) {
      if (in.slot_keep == 0) {
        if (fast != nullptr) {
          fast(q_label, group, r, row, stride, n, rows_out, in.reduce_max, out + t, row_stride);
          t = page_end;
          continue;
        }
        score_run(q_label, group, r, row, stride, n, rows_out, in.reduce_max, out + t, row_stride);
        t = page_end;
        continue;
      }
    }
    for (int64_t i = 0; i < n; ++i, row += stride) {  // unpack (pruned keys) or convert (fp16 / bf16) each label
      if (in.slot_keep > 0) {  // exact scores on a pruned key: unpack its kept channels
        const uint8_t* bits = reinterpret_cast<const uint8_t*>(row + 2 * in.slot_keep);
        const int64_t bytes = (dim + 7) / 8;
        unpack_vector(row, [&](int64_t j) {
          return static_cast<uint16_t>(bits[2 * j] | (2 * j + 1 < bytes ? bits[2 * j + 1] << 8 : 0));
        }, dim, dense);
      } else {
        for (int64_t c = 0; c < r; ++c) dense[c] = static_cast<float>(row[c]);
      }
      score_run(q_label, group, r, dense, 0, 1, rows_out, in.reduce_max, out + t + i, row_stride);
    }
    t = page_end;
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
  // One item per (sequence, KV head). The group's query heads restricted to the label channels, once per item.
  const int64_t items = batch * kv_heads;
  std::vector<float> q_labels(items * group * r);
  for (int64_t item = 0; item < items; ++item) {
    const int64_t b = item / kv_heads, g = item % kv_heads;
    for (int64_t h = 0; h < group; ++h) {
      const float* qh = qf + (b * q_heads + g * group + h) * q.size(2);
      for (int64_t c = 0; c < r; ++c) q_labels[(item * group + h) * r + c] = qh[channels[g * r + c]];
    }
  }
  auto budget_of = [&](int64_t b) { return std::clamp<int64_t>(budgets[b], 0, k); };
  auto needs_scores = [&](int64_t item) { return lens[item / kv_heads] > budget_of(item / kv_heads); };
  auto select = [&](int64_t item, const float* scores, int64_t row_stride, std::vector<uint32_t>& keys) {
    const int64_t b = item / kv_heads, g = item % kv_heads, len = lens[b];
    const int64_t row0 = b * heads + (in.per_group ? g : g * group);
    for (int64_t j = 0; j < rows_per_item; ++j) {
      cnt[row0 + j] = select_row(scores + j * row_stride, len, budget_of(b), sink, recent, idx + (row0 + j) * k, keys);
    }
  };
  const int64_t threads = at::get_num_threads();
  constexpr int64_t kChunk = 2048;          // tokens scored per task when there are few items
  constexpr int64_t kSerialTokens = 8192;   // fewer labels than this are scored on one thread
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (items >= 4 * threads) {  // many items: each thread scores and selects whole items
      at::parallel_for(0, items, 1, [&](int64_t first, int64_t last) {
        std::vector<float> scores;
        std::vector<uint32_t> keys;
        for (int64_t item = first; item < last; ++item) {
          const int64_t len = lens[item / kv_heads];
          if (!needs_scores(item)) {  // every token fits: no scores needed
            select(item, nullptr, 0, keys);
            continue;
          }
          scores.resize(rows_per_item * len);
          score_tokens<scalar_t>(in, q_labels.data() + item * group * r, rows_per_item, item / kv_heads,
                                 item % kv_heads, 0, len, scores.data(), len);
          select(item, scores.data(), len, keys);
        }
      });
      return;
    }
    // Few items (small batches, long contexts): score chunks of every item in parallel, then select per item.
    int64_t max_len = 0;
    for (int64_t b = 0; b < batch; ++b) max_len = std::max<int64_t>(max_len, lens[b]);
    std::vector<float> scores(items * rows_per_item * max_len);
    std::vector<std::pair<int64_t, int64_t>> tasks;  // (item, first token)
    for (int64_t item = 0; item < items; ++item) {
      for (int64_t t = 0; needs_scores(item) && t < lens[item / kv_heads]; t += kChunk) tasks.emplace_back(item, t);
    }
    int64_t tokens = 0;  // labels to score; few (short contexts) are scored on the calling thread
    for (int64_t item = 0; item < items; ++item) tokens += needs_scores(item) ? lens[item / kv_heads] : 0;
    const int64_t num_tasks = static_cast<int64_t>(tasks.size()), grain = tokens < kSerialTokens ? num_tasks + 1 : 1;
    at::parallel_for(0, num_tasks, grain, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        const auto [item, t] = tasks[i];
        const int64_t len = lens[item / kv_heads];
        score_tokens<scalar_t>(in, q_labels.data() + item * group * r, rows_per_item, item / kv_heads,
                               item % kv_heads, t, std::min(t + kChunk, len),
                               scores.data() + item * rows_per_item * max_len, max_len);
      }
    });
    at::parallel_for(0, items, tokens < kSerialTokens ? items + 1 : 1, [&](int64_t first, int64_t last) {
      std::vector<uint32_t> keys;
      for (int64_t item = first; item < last; ++item) {
        select(item, scores.data() + item * rows_per_item * max_len, max_len, keys);
      }
    });
  };
  if (in.label_scales.defined()) {  // quantized labels: int8 codes, or int4 codes two per byte
    if (in.labels.scalar_type() == at::kChar) {
      run(int8_t{});
    } else {
      run(uint8_t{});
    }
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.labels.scalar_type(), "decode_select_cpu",
                                    [&] { run(scalar_t{}); });
  }
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
    std::vector<uint32_t> keys;  // per-thread scratch
#pragma omp for schedule(dynamic, 4)
    for (int64_t row = 0; row < batch * heads; ++row) {
      const int64_t b = row / heads;
      const int64_t row_len = std::clamp<int64_t>(len[b], 0, max_len);
      const int64_t row_budget = budget ? std::clamp<int64_t>(budget[b], 0, k) : k;
      cnt[row] = select_row(s + row * max_len, row_len, row_budget, sink, recent, idx + row * k, keys);
    }
  }
  return {indices, counts};
}

}  // namespace sparse_attn
