// Pooled block scores on the CPU: the estimate head-proxy selection ranks blocks by, computed tile by tile without
// materializing a row's scores.
//
// For every sampled query row r of a proxy head (position pos_r) the softmax over its visible keys is
// P[r, n] = 2^(s[r, n] - m_r) / l_r with s = q.k * scale * log2(e). Per row and KV block j the kernel keeps a
// reference bm[j] and the sum bs[j] = sum_{n in j} 2^(s[r, n] - bm[j]), one pass over the keys: bm[j] is the block's
// max score (max pooling needs it) or the row's running max when the block was scored (mean pooling: one exp2 per
// score and no per-block max). At the row's end m_r = max_j bm[j] and l_r = sum_j bs[j] 2^(bm[j] - m_r), and the
// block's pooled value is
//   max pooling:  max_{n in j} P[r, n] = 2^(bm[j] - m_r) / l_r   (the max over the block's rows is kept),
//   mean pooling: sum_{n in j} P[r, n] = bs[j] 2^(bm[j] - m_r) / l_r   (averaged over the block's rows).
//
// One work item is (KV head, a chunk of query blocks): the sampled rows of every proxy head that reads the KV head
// and of every query block of the chunk are stacked into one Q tile (up to kTileRows rows), so each key tile is
// read once per chunk and the score products are tall GEMMs. A chunk reads the keys up to its last row (causal).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "kernel_utils.h"

namespace sparse_attn {
namespace {

constexpr int64_t kTileRows = 256;  // Q tile rows per work item (all proxy heads of a KV head, several blocks)
constexpr int64_t kTileKeys = 256;  // keys per tile (rounded up to whole KV blocks)

// sum_c 2^(s[c] - m) over n scores (inlined into the callers' ISA clones, where it vectorizes).
inline float exp2_sum(const float* s, int64_t n, float m) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += exp2_nonpositive(s[c] - m);
  return sum;
}

// Mean pooling needs only each block's sum, taken against one reference per row and tile: the row's running max
// `ref` (raised to the tile's max first). Per block: bsum = sum 2^(s - ref), bmax = ref (the sum's scale).
SPARSE_ATTN_ISA_CLONES
void block_stats_mean_generic(const float* s, int64_t n, int64_t bk, float m, float* bmax, float* bsum) {
  for (int64_t b0 = 0, j = 0; b0 < n; b0 += bk, ++j) {
    bmax[j] = m;
    bsum[j] = exp2_sum(s + b0, std::min(bk, n - b0), m);
  }
}

// Max pooling: per block of bk scores (the last one may be shorter), its max bm and its sum 2^(s - bm).
SPARSE_ATTN_ISA_CLONES
void block_stats_max_generic(const float* s, int64_t n, int64_t bk, float* bmax, float* bsum) {
  for (int64_t b0 = 0, j = 0; b0 < n; b0 += bk, ++j) {
    const int64_t len = std::min(bk, n - b0);
    float m = kNegInf;
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < len; ++c) m = s[b0 + c] > m ? s[b0 + c] : m;
    bmax[j] = m;
    bsum[j] = exp2_sum(s + b0, len, m);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// 16 lanes of exp2_nonpositive: 2^x = 2^k 2^f with k = round(x), the same polynomial in f, scaled by 2^k.
SPARSE_ATTN_AVX512 inline __m512 exp2_nonpositive16(__m512 x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-126.0f), x);  // NaN stays NaN (max returns its second operand)
  const __m512 k = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xc, k);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 7
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);  // 0 below 2^-126
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, k));
}

// The lanes of a vector of 16 that hold one of the `left` values still to read.
inline __mmask16 live_lanes(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}

// exp2_sum on AVX-512: 16-lane partial sums, reduced once.
SPARSE_ATTN_AVX512 inline float exp2_sum16(const float* s, int64_t n, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 live = live_lanes(n - c);
    const __m512 x = _mm512_maskz_loadu_ps(live, s + c);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(live, exp2_nonpositive16(_mm512_sub_ps(x, vm))));
  }
  return _mm512_reduce_add_ps(acc);
}

// Blocks of a multiple of 16 keys.
SPARSE_ATTN_AVX512 void block_stats_mean_avx512(const float* s, int64_t n, int64_t bk, float m, float* bmax,
                                                float* bsum) {
  for (int64_t b0 = 0, j = 0; b0 < n; b0 += bk, ++j) {
    bmax[j] = m;
    bsum[j] = exp2_sum16(s + b0, std::min(bk, n - b0), m);
  }
}

SPARSE_ATTN_AVX512 void block_stats_max_avx512(const float* s, int64_t n, int64_t bk, float* bmax, float* bsum) {
  for (int64_t b0 = 0, j = 0; b0 < n; b0 += bk, ++j) {
    const int64_t len = std::min(bk, n - b0);
    __m512 top = _mm512_set1_ps(kNegInf);
    for (int64_t c = 0; c < len; c += 16) {
      const __mmask16 live = live_lanes(len - c);
      top = _mm512_mask_max_ps(top, live, _mm512_maskz_loadu_ps(live, s + b0 + c), top);  // NaN scores are passed over
    }
    bmax[j] = _mm512_reduce_max_ps(top);
    bsum[j] = exp2_sum16(s + b0, len, bmax[j]);
  }
}
#endif

// Max pooling: per block of bk scores (the last one may be shorter), its max bm and its sum 2^(s - bm).
void block_stats_max(const float* s, int64_t n, int64_t bk, float* bmax, float* bsum) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (bk % 16 == 0 && has_avx512()) return block_stats_max_avx512(s, n, bk, bmax, bsum);
#endif
  block_stats_max_generic(s, n, bk, bmax, bsum);
}

SPARSE_ATTN_ISA_CLONES
float running_max(const float* s, int64_t n, float m) {
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = s[c] > m ? s[c] : m;
  return m;
}

void block_stats_mean(const float* s, int64_t n, int64_t bk, float* ref, float* bmax, float* bsum) {
  const float m = running_max(s, n, *ref);
  *ref = m;
  if (m == kNegInf) return;
#if defined(__x86_64__) && defined(__GNUC__)
  if (bk % 16 == 0 && has_avx512()) return block_stats_mean_avx512(s, n, bk, m, bmax, bsum);
#endif
  block_stats_mean_generic(s, n, bk, m, bmax, bsum);
}

// One row's pooled values over its first n blocks (references bm, sums bs): weights w = 2^(bm - max bm), l = sum bs w;
// mean pooling adds bs w / (l valid) to dst, max pooling keeps max(dst, w / l).
SPARSE_ATTN_ISA_CLONES
void pool_row(const float* bm, const float* bs, int64_t n, bool mean, int64_t valid, float* w, float* dst) {
  float top = kNegInf;
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < n; ++j) top = bm[j] > top ? bm[j] : top;
  if (top == kNegInf) return;
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    w[j] = exp2_nonpositive(bm[j] - top);
    total += bs[j] * w[j];
  }
  if (mean) {
    const float scale = 1.0f / (total * static_cast<float>(valid));
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] += bs[j] * w[j] * scale;
  } else {
    const float scale = 1.0f / total;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = std::max(dst[j], w[j] * scale);
  }
}

struct Chunk {
  int64_t cost;
  int32_t kv_head, first_block, last_block;  // query blocks [first_block, last_block)
};

// The products named (see PooledBlockScoresInputs), checked against this CPU and the head dim.
Products products_of(const std::string& name, int64_t dim) {
  if (name == "auto") return estimate_products(dim);
  if (name == "fp32") return Products::kFp32;
  TORCH_CHECK(name == "bf16" || name == "int16", "products must be 'auto', 'fp32', 'bf16' or 'int16', got '", name,
              "'");
  const Products want = name == "bf16" ? Products::kBf16 : Products::kInt16;
  bool available = dim % 32 == 0;
#if defined(__x86_64__) && defined(__GNUC__)
  available = available && (want == Products::kBf16 ? has_avx512_bf16() : has_avx512_vnni());
#else
  available = false;
#endif
  TORCH_CHECK(available, "products='", name, "' needs ", want == Products::kBf16 ? "AVX512-BF16" : "AVX512-VNNI",
              " and a head dim that is a multiple of 32 (head dim ", dim, ")");
  return want;
}

template <typename T>
void pooled_scores(const PooledBlockScoresInputs& in, at::Tensor& out) {
  const auto& q = in.q;  // [P, nq, R, D]
  const int64_t proxies = q.size(0), nq = q.size(1), rows = q.size(2), dim = q.size(3);
  const int64_t kv_len = in.k.size(0), kv_heads = in.k.size(1), bk = in.kv_block_size;
  const int64_t nk = out.size(2), per_kv = proxies / kv_heads;
  const int64_t tile_keys = std::max(kTileKeys, bk) / bk * bk;
  const int64_t tile_cols = (tile_keys + 15) / 16 * 16;  // score rows: room for the tall products' 16-key vectors
  const int64_t chunk_blocks = std::max<int64_t>(1, kTileRows / (per_kv * rows));
  const float mul = static_cast<float>(in.scale) * kLog2e;
  const T* qp = q.data_ptr<T>();
  const T* kp = in.k.data_ptr<T>();
  const int64_t k_stride_t = in.k.stride(0), k_stride_h = in.k.stride(1);
  const int32_t* pos = in.pos.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  const bool blas = sgemm_ != nullptr;
  const Products products = products_of(in.products, dim);

  // Keys the rows of query blocks [first, last) may see: up to their largest position (causal), else all.
  auto keys_seen = [&](int64_t first, int64_t last) {
    if (!in.causal) return kv_len;
    int64_t top = -1;
    for (int64_t i = first * rows; i < last * rows; ++i) top = std::max<int64_t>(top, pos[i]);
    return std::min(kv_len, top + 1);
  };
  std::vector<int64_t> valid_rows(nq, 0);  // sampled rows of each query block (mean pooling averages over them)
  for (int64_t i = 0; i < nq * rows; ++i) valid_rows[i / rows] += pos[i] >= 0;
  std::vector<Chunk> chunks;
  for (int64_t g = 0; g < kv_heads; ++g) {
    for (int64_t i = 0; i < nq; i += chunk_blocks) {
      const int64_t last = std::min(nq, i + chunk_blocks);
      chunks.push_back({keys_seen(i, last) * (last - i), static_cast<int32_t>(g), static_cast<int32_t>(i),
                        static_cast<int32_t>(last)});
    }
  }
  std::stable_sort(chunks.begin(), chunks.end(), [](const Chunk& x, const Chunk& y) { return x.cost > y.cost; });

  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_chunks));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const int64_t max_rows = per_kv * chunk_blocks * rows;
    std::vector<float> qt(max_rows * dim), s(max_rows * tile_cols), bt(tile_cols * dim);
    const int64_t pair_words = products == Products::kFp32 ? 0 : dim / 2;  // bf16 / int16: words of channel pairs
    std::vector<uint32_t> q_pairs(max_rows * pair_words), k_pairs(tile_keys * pair_words),
        kt_pairs(tile_cols * pair_words);
    std::vector<float> kt(std::is_same_v<T, float> ? 0 : tile_keys * dim);
    std::vector<float> q_scale(products == Products::kInt16 ? max_rows : 0),
        k_scale(products == Products::kInt16 ? tile_cols : 0);
    std::vector<float> bmax(max_rows * nk), bsum(max_rows * nk), ref(max_rows), weight(nk);
    for (int64_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) {
      const Chunk& ch = chunks[c];
      const int64_t blocks = ch.last_block - ch.first_block, m = per_kv * blocks * rows;
      const int64_t seen = keys_seen(ch.first_block, ch.last_block), seen_blocks = (seen + bk - 1) / bk;
      // Tile row (j, i, r): proxy head g * per_kv + j, query block first_block + i, sampled row r.
      for (int64_t j = 0; j < per_kv; ++j) {
        const T* src = qp + ((ch.kv_head * per_kv + j) * nq + ch.first_block) * rows * dim;
        to_float(src, dim, blocks * rows, dim, mul, qt.data() + j * blocks * rows * dim);
      }
      // int16 products: the tile's rows quantized once for all its key tiles (fp32 products where m <= 4 or a row
      // holds NaN or inf).
      const bool q_int16 = products == Products::kInt16 && m > 4 &&
                           to_int16_pairs(RowsOf(qt.data(), dim), m, m, dim, int16_limit(dim), q_pairs.data(),
                                          q_scale.data());
      std::fill(bmax.begin(), bmax.begin() + m * nk, kNegInf);
      std::fill(bsum.begin(), bsum.begin() + m * nk, 0.0f);
      std::fill(ref.begin(), ref.begin() + m, kNegInf);
      const T* k_head = kp + ch.kv_head * k_stride_h;
      for (int64_t start = 0; start < seen; start += tile_keys) {
        const int64_t n = std::min(tile_keys, seen - start);
        const float* keys;
        int64_t ldk;
        if constexpr (std::is_same_v<T, float>) {
          keys = k_head + start * k_stride_t, ldk = k_stride_t;
        } else {
          to_float(k_head + start * k_stride_t, k_stride_t, n, dim, 1.0f, kt.data());
          keys = kt.data(), ldk = dim;
        }
        const RowsOf key_rows(keys, ldk);
        const bool done =
            (q_int16 && gemm_abt_int16(m, n, dim, q_pairs.data(), q_scale.data(), key_rows, s.data(), tile_cols,
                                       k_pairs.data(), kt_pairs.data(), k_scale.data())) ||
            (products == Products::kBf16 && gemm_abt_tall_bf16(m, n, dim, qt.data(), dim, key_rows, s.data(),
                                                               tile_cols, q_pairs.data(), k_pairs.data(),
                                                               kt_pairs.data()));
        if (!done) {
          gemm_abt(blas, m, n, dim, qt.data(), dim, key_rows, s.data(), tile_cols, bt.data());
        }
        for (int64_t t = 0; t < m; ++t) {
          const int64_t row_pos = pos[(ch.first_block + (t / rows) % blocks) * rows + t % rows];
          if (row_pos < 0) continue;  // an empty slot
          const int64_t visible = in.causal ? std::min(n, row_pos + 1 - start) : n;
          if (visible <= 0) continue;
          const int64_t jb = start / bk;
          if (in.mean) {
            block_stats_mean(s.data() + t * tile_cols, visible, bk, &ref[t], &bmax[t * nk + jb], &bsum[t * nk + jb]);
          } else {
            block_stats_max(s.data() + t * tile_cols, visible, bk, &bmax[t * nk + jb], &bsum[t * nk + jb]);
          }
        }
      }
      // Normalize each row and pool into its query block.
      for (int64_t t = 0; t < m; ++t) {
        const int64_t i = ch.first_block + (t / rows) % blocks, proxy = ch.kv_head * per_kv + t / (blocks * rows);
        if (pos[i * rows + t % rows] < 0) continue;
        const int64_t valid = in.mean ? valid_rows[i] : 1;
        pool_row(bmax.data() + t * nk, bsum.data() + t * nk, seen_blocks, in.mean, valid, weight.data(),
                 o + (proxy * nq + i) * nk);
      }
    }
  });
}

}  // namespace

// Block selection from pooled scores, per (query head h, query block i): the always-kept blocks (block 0, the
// attention sink, and the diagonal block diag[i] >= 0) count first within the budget b_h; the rest of the budget goes
// to the visible blocks j < bound[i] with the highest scores of head h's proxy (ties: the lower block, a strict total
// order, so every head's set is defined). Query blocks i >= tail_from keep every block. Heads sharing a proxy share
// its candidates: one selection (nth_element, linear) per distinct budget, largest first, each within the last.
void select_blocks_cpu(const SelectBlocksInputs& in, at::Tensor& keep) {
  const int64_t proxies = in.scores.size(0), nq = in.scores.size(1), nk = in.scores.size(2);
  const int64_t heads = in.budgets.size(0);
  const float* sc = in.scores.data_ptr<float>();
  const int64_t* budget = in.budgets.data_ptr<int64_t>();
  const int64_t* proxy = in.proxy_of_head.data_ptr<int64_t>();
  const int64_t* bound = in.bounds.data_ptr<int64_t>();
  const int64_t* diag = in.diag.data_ptr<int64_t>();
  bool* out = keep.data_ptr<bool>();
  std::vector<std::vector<int64_t>> heads_of(proxies);
  for (int64_t h = 0; h < heads; ++h) heads_of[proxy[h]].push_back(h);
  at::parallel_for(0, proxies * nq, 64, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> order(nk);
    std::vector<float> val(nk);
    std::vector<int64_t> take, ranks;  // per head of the proxy: blocks beyond the always-kept ones; their sizes
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / nq, i = item % nq;
      if (heads_of[p].empty()) continue;
      if (i >= in.tail_from) {
        for (int64_t h : heads_of[p]) std::fill_n(out + (h * nq + i) * nk, nk, true);
        continue;
      }
      const int64_t visible = std::min(bound[i], nk), d = diag[i];
      const bool has_diag = d > 0 && d < nk;  // d == 0 is the sink itself
      const int64_t always = 1 + (has_diag ? 1 : 0);
      // Candidates: the visible blocks other than the always-kept ones (NaN scores rank last).
      const float* s = sc + (p * nq + i) * nk;
      int64_t n = 0;
      for (int64_t j = 1; j < visible; ++j) {
        if (j == d) continue;
        val[j] = std::isnan(s[j]) ? kNegInf : s[j];
        order[n++] = static_cast<int32_t>(j);
      }
      auto better = [&val](int32_t a, int32_t b) { return val[a] > val[b] || (val[a] == val[b] && a < b); };
      take.clear();
      for (int64_t h : heads_of[p]) take.push_back(std::min(n, std::max<int64_t>(0, budget[h] - always)));
      ranks = take;
      std::sort(ranks.begin(), ranks.end(), std::greater<int64_t>());
      int64_t range = n;
      for (int64_t t : ranks) {  // the best t of the best `range`: one linear selection each
        if (t > 0 && t < range) std::nth_element(order.begin(), order.begin() + t, order.begin() + range, better);
        range = t;
      }
      for (size_t x = 0; x < heads_of[p].size(); ++x) {
        bool* row = out + (heads_of[p][x] * nq + i) * nk;
        row[0] = true;
        if (has_diag) row[d] = true;
        for (int64_t t = 0; t < take[x]; ++t) row[order[t]] = true;
      }
    }
  });
}

const char* estimate_products_cpu(int64_t dim) {
  switch (estimate_products(dim)) {
    case Products::kBf16: return "bf16";
    case Products::kInt16: return "int16";
    default: return "fp32";
  }
}

at::Tensor pooled_block_scores_cpu(const PooledBlockScoresInputs& in) {
  const int64_t nk = (in.k.size(0) + in.kv_block_size - 1) / in.kv_block_size;
  auto out = at::zeros({in.q.size(0), in.q.size(1), nk}, in.q.options().dtype(at::kFloat));
  if (in.q.numel() == 0 || nk == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "pooled_block_scores_cpu",
                                  [&] { pooled_scores<scalar_t>(in, out); });
  return out;
}

}  // namespace sparse_attn
